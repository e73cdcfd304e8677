#!/usr/bin/env python
"""Tables 2–5 and Figures 3–5 from a folder of run records.

    python scripts/make_results.py --runs runs/mini --out results
    python scripts/make_results.py --runs runs/paper --out results --only table2 figure4
    python scripts/make_results.py --runs runs/mini --out results/demo --only demo --print
    python scripts/make_results.py --runs runs/mini --out results --only runs   # records + ΔW spectra, no weights
    python scripts/make_results.py --runs runs/mini --out results --only verdicts   # dev-halves Tables 2, 4, lr curves

Writes results/tables/table{2,3,4,5}.{md,csv,tex} and
results/figures/figure{3,4,5}.{png,pdf} (`demo`, a slice of Table 2, only when
named; `runs`, the records without weights under <out>/runs/, only when named;
`heldout` and `verdicts`, the held-out and dev-halves protocols' tables, in every full build);
an artifact with no runs yet is skipped with a message. Nothing is typed by hand: every number comes from a
record.json (and, for Tables 3/5, the run's eval_record.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from melora.experiments.report import ARTIFACTS, EXTRAS, include, make_results
from melora.experiments.report.build import FULL_BUILD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/mini", help="folder of run records, e.g. runs/mini (default) or runs/paper")
    parser.add_argument("--out", default="results", help="output root: <out>/tables and <out>/figures (default: results)")
    asked_only = ", ".join(e for e in EXTRAS if e not in FULL_BUILD)
    parser.add_argument("--only", nargs="+", choices=ARTIFACTS + EXTRAS, metavar="NAME",
                        help=f"some of {', '.join(ARTIFACTS + EXTRAS)} (default: all but {asked_only})")
    parser.add_argument("--model", help="model name (configs/model/<name>) when the runs folder holds several")
    parser.add_argument("--profile", help="paper | mini | smoke, when the runs folder holds several")
    parser.add_argument("--threshold", type=float, default=0.1, help="Figure 3: count singular values above this (paper: 0.1)")
    parser.add_argument("--print", action="store_true", help="also print each table (Markdown) to stdout")
    args = parser.parse_args(argv)
    try:
        make_results(args.runs, args.out, only=args.only, model=args.model, profile=args.profile, threshold=args.threshold,
                     show=print if args.print else None)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if Path(args.out).resolve() == include.ROOT / "results":  # the documents that include these files follow them
        missing: list[str] = []
        for path in include.update(missing=missing):
            print(f"updated {path}")
        for source in dict.fromkeys(missing):
            print(f"{source} is not built yet: the documents' blocks that include it are left as they were")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
