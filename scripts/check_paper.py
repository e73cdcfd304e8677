"""Paper-shape dry runs, offline: every paper configuration for a few optimiser steps on random weights.

    python scripts/check_paper.py                     # = make check-paper: 48 GLUE runs + Alpaca/INSTRUCTEVAL
    python scripts/check_paper.py --tasks mrpc,rte --methods melora_n8_r1 --only glue
    python scripts/check_paper.py --extra trainer.mixed_precision=bf16 --cut steps=4 glue_batch=16

Each run is ``python -m melora.experiments.glue|instruct|instructeval profile=paper
model=roberta-base|llama2-7b model.source=path model.name_or_path=<folder> ...``
in a fresh interpreter, on the folders of :mod:`melora.experiments.paper_shapes` (the paper
models' exact architectures, random weights, local tokenizers) and the real
offline data (with stand-ins for the GLUE files this machine lacks). The
paper profile's lr, max length, warm-up and schedule stay; steps, batch sizes
and example counts are cut for a CPU, and the command prints the cuts. One line
per run: ``ok`` with its time, or ``FAIL`` with the one-line error; exit status
1 if any failed. Runs go to a temporary folder (``--runs`` to choose one), kept
when a run fails or with ``--keep``, with each run's output in ``logs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from melora.experiments.paper_shapes import (
    GLUE_METHODS,
    GLUE_TASKS,
    INSTRUCT_METHODS,
    Cut,
    check_data_dir,
    glue_combinations,
    instruct_combinations,
    paper_shape_folder,
    run_combination,
    shapes_root,
)


def _names(value: str, known, what: str) -> list[str]:
    names = [v for v in value.split(",") if v]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"Error: unknown {what} {bad}; choose from {', '.join(known)}")
    return names


def _cut(pairs: list[str]) -> Cut:
    fields = {f.name for f in dataclasses.fields(Cut)}
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields or not value.isdigit():
            raise SystemExit(f"Error: --cut takes KEY=INT with KEY in {', '.join(sorted(fields))}; got {pair!r}")
        values[key] = int(value)
    return Cut(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("glue", "instruct"), help="only the GLUE runs, or only Alpaca + INSTRUCTEVAL")
    parser.add_argument("--tasks", default=",".join(GLUE_TASKS), help="GLUE tasks, comma-separated (default: all 8)")
    parser.add_argument("--methods", default=",".join(GLUE_METHODS), help="GLUE methods (default: Table 2's 6)")
    parser.add_argument("--instruct-methods", default=",".join(INSTRUCT_METHODS), help="Alpaca methods (default: %(default)s)")
    parser.add_argument("--no-eval", action="store_true", help="skip INSTRUCTEVAL after the Alpaca runs")
    parser.add_argument("--layers", type=int, default=1, help="LLaMA-2-7B decoder layers in the folder (the model has 32; default 1)")
    parser.add_argument("--dtype", default="bf16", help="LLaMA folder's storage dtype (default bf16, what model=llama2-7b loads)")
    parser.add_argument("--cache", type=Path, help="where the model folders are kept (default $MELORA_CACHE/paper-shapes)")
    parser.add_argument("--data-dir", type=Path, help="the offline data folder (default $MELORA_DATA_DIR)")
    parser.add_argument("--runs", type=Path, help="runs folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the runs folder when every run passes")
    cuts = ", ".join(f.name for f in dataclasses.fields(Cut))
    parser.add_argument("--cut", nargs="+", default=[], metavar="KEY=INT", help=f"change a cut, e.g. steps=4 ({cuts})")
    parser.add_argument("--extra", action="append", default=[], metavar="OVERRIDE",
                        help="a Hydra override for every run, e.g. trainer.mixed_precision=bf16 (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run (default %(default)s)")
    args = parser.parse_args(argv)
    tasks = _names(args.tasks, GLUE_TASKS, "GLUE task(s)")
    methods = _names(args.methods, GLUE_METHODS, "GLUE method(s)")
    instruct_methods = _names(args.instruct_methods, INSTRUCT_METHODS, "Alpaca method(s)")
    cut = _cut(args.cut)
    glue, instruct = args.only in (None, "glue"), args.only in (None, "instruct")

    started = time.perf_counter()
    print("check-paper: the paper configurations on the paper models' architectures with random weights (offline)", flush=True)
    runs = args.runs or Path(tempfile.mkdtemp(prefix="melora-check-paper-"))
    data_dir, standins = check_data_dir(shapes_root(args.cache) / "data", args.data_dir)
    combinations = []
    if glue:
        roberta = paper_shape_folder("roberta-base", args.cache, args.data_dir)
        print(f"model: roberta-base's architecture (12 x 768, 50265 tokens), fp32: {roberta}")
        combinations += glue_combinations(roberta, data_dir, runs, cut, tasks, methods)
    if instruct:
        llama = paper_shape_folder("llama2-7b", args.cache, args.data_dir, num_hidden_layers=args.layers, dtype=args.dtype)
        print(f"model: LLaMA-2-7B's layer shapes (4096 / 11008, 32 heads, 32000 tokens), {args.layers} of 32 layers, {args.dtype}: {llama}")
        combinations += instruct_combinations(llama, data_dir, runs, cut, instruct_methods, evaluate=not args.no_eval)
    print(f"data: {data_dir}" + (f"; stand-ins (not offline here) for {', '.join(standins)}" if standins else ""))
    print("\n".join(cut.describe()))
    if args.extra:
        print(f"every run also gets: {' '.join(args.extra)}")
    print(f"runs: {runs}", flush=True)

    outcomes, failed_training = [], set()
    for combination in combinations:
        # An evaluation of a run that failed would only repeat its error.
        if combination.entry == "melora.experiments.instructeval" and combination.label.split()[-1] in failed_training:
            print(f"skip            {combination.label:<34} its training run failed", flush=True)
            continue
        outcome = run_combination(combination, *args.extra, timeout=args.timeout, log_dir=runs / "logs")
        outcomes.append(outcome)
        if not outcome.ok and combination.entry == "melora.experiments.instruct":
            failed_training.add(combination.label.split()[-1])
        print(outcome.line(), flush=True)

    failed = [o for o in outcomes if not o.ok]
    minutes = (time.perf_counter() - started) / 60
    print(f"{len(outcomes)} runs: {len(outcomes) - len(failed)} ok, {len(failed)} failed, {minutes:.1f} min")
    if failed or args.keep or args.runs:
        print(f"runs and logs kept in {runs}" + (f" (each run's output: {runs / 'logs'})" if failed else ""))
    else:
        shutil.rmtree(runs, ignore_errors=True)
    return 1 if failed or len(outcomes) < len(combinations) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
