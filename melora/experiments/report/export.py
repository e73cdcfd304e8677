"""A runs folder without its weights: what ``results/runs/<profile>/`` commits.

For every run: ``record.json``, ``config.yaml``, ``predictions.safetensors`` (dev-halves runs) and (instruct runs)
``eval_record.json`` are copied under the same relative path, as are the
INSTRUCTEVAL folders (``eval_record.json``, ``config.yaml``), and the best
adapter of a GLUE LoRA or MELoRA run is reduced to ``spectra.json``, the singular values of every
adapted layer's ``ΔW`` (what Figure 3 and ``notebooks/singular_values.ipynb``
need). ``load_records`` and ``run_spectra`` read such a folder like a runs folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from melora.experiments.report.records import EVAL_RECORD, load_records, method_config_of
from melora.experiments.report.spectra import SPECTRA_FILE, has_adapter, run_spectra
from melora.experiments.runs import RECORD_FILE
from melora.experiments.train.predictions import PREDICTIONS_FILE
from melora.files import atomic_write_json

COPIED = (RECORD_FILE, "config.yaml", EVAL_RECORD, PREDICTIONS_FILE)
# Singular values at or below this are the SVD's round-off (ΔW has rank ≤ n·r): not stored.
ZERO = 1e-10


def spectra_json(record: dict) -> dict:
    """``{"layers": {path: {"singular_values": [...], "nominal_rank": k}}}`` of the run's adapter.

    The fp64 singular values above ``ZERO``, largest first, to 7 significant digits.
    """
    spectra = run_spectra(record)
    return {
        "source": f"fp64 singular values > {ZERO:g} of ΔW (scaling included) of the run's best adapter; melora.analysis.singular_values",
        "layers": {
            name: {"singular_values": [float(f"{v:.7g}") for v in sp.singular_values.tolist() if v > ZERO], "nominal_rank": sp.nominal_rank}
            for name, sp in spectra.items()
        },
    }


def _copy_files(source: Path, target: Path) -> None:
    """Copy the ``COPIED`` files that ``source`` holds into ``target`` (created)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def export_runs(runs: str | Path, out: str | Path, log: Callable[[str], None] = print) -> int:
    """Copy the records of every run under ``runs`` to ``out`` (same layout); returns the run count.

    Runs already exported with an unchanged record are left alone, so a rerun
    after a few new runs only computes their spectra. A run still in progress
    (``status: running``: training now, or killed and waiting to resume) is not
    exported: a snapshot of it would read as a finished run's record.
    """
    runs, out = Path(runs), Path(out)
    count = 0
    for record in load_records(runs):
        source = Path(record["run_dir"])
        if not (source / RECORD_FILE).is_file():  # a base model's evaluation: copied below
            continue
        if record.get("status") == "running":
            continue
        target = out / source.relative_to(runs)
        unchanged = (target / RECORD_FILE).is_file() and (target / RECORD_FILE).read_bytes() == (source / RECORD_FILE).read_bytes()
        _copy_files(source, target)
        wants_spectra = record.get("kind") == "glue" and getattr(method_config_of(record), "has_spectra", False) and has_adapter(record)
        if wants_spectra and not (unchanged and (target / SPECTRA_FILE).is_file()):
            atomic_write_json(target / SPECTRA_FILE, spectra_json(record))
        count += 1
    # INSTRUCTEVAL results in their own folders (<profile>/instructeval/<model>/<name>/),
    # base models' included: load_records links them to the training records again.
    evaluations = 0
    for path in sorted(runs.rglob(EVAL_RECORD)):
        if (path.parent / RECORD_FILE).is_file():
            continue  # in a training run's folder: copied above
        _copy_files(path.parent, out / path.parent.relative_to(runs))
        evaluations += 1
    log(f"exported {count} run records" + (f" and {evaluations} evaluations" if evaluations else "") + f" to {out}")
    return count
