"""The paper's tables and figures, built from run records (never typed by hand).

``records``  loading ``record.json`` (+ instruction-tuning ``eval_record.json``) files
``stats``    mean ± std over seeds
``tables``   row/column specs, aggregation with best-setting selection, provenance caption
``paper``    the definitions of Tables 2–5 (and ``make demo``'s slice) and the place for the paper's own numbers
``render``   Markdown, CSV and LaTeX writers
``spectra``  Figure 3's statistic from saved adapters
``figures``  Figures 3–5 (matplotlib, Agg)
``protocol`` the held-out protocol's Tables 2 and 4: lr and n chosen on validation, paired verdicts
``verdicts`` the dev-halves protocol's Tables 2 and 4, lr curves and longer training (on ``protocol``)
``build``    everything for one runs folder (what ``scripts/make_results.py`` calls)
"""

from melora.experiments.report.build import ARTIFACTS, EXTRAS, make_results
from melora.experiments.report.records import load_records
from melora.experiments.report.tables import Table

__all__ = ["ARTIFACTS", "EXTRAS", "Table", "load_records", "make_results"]
