"""Experiment specs: which runs a paper artifact needs, and running the missing ones.

A spec (``experiments/<name>.yaml``) lists groups of runs as Hydra overrides::

    name: table2
    entry: glue                     # glue | instruct
    profiles:                       # per-profile settings
      paper: {seeds: [0, 1, 2, 3, 4], overrides: [model=roberta-base], tasks: [glue/mnli, glue/rte]}
      mini:  {seeds: [0], overrides: [model=minilm], tasks: [glue/rte]}
    groups:
      - methods:                    # tasks: the profile's, unless the group lists its own
          - [method=lora, method.r=8]
          - [method=melora, method.r=8, "method.n=2,4,8"]   # a comma list is swept
      - profiles: [paper]           # optional: the group runs at these profiles only
        tasks: [glue/mrpc]
        methods:
          - [method=lora, method.r=16]

``expand(spec, profile)`` gives one override list per run (the cross product of
tasks × methods × comma lists × seeds). The runs are a Hydra multirun: the
``spec`` sweeper (``hydra_plugins/melora_sweeper``) leaves out the runs whose
record is complete (a run is identified by its resolved config) and hands the
rest to Hydra's launcher: ``hydra/launcher=local`` (joblib, ``n_jobs`` worker
processes on this machine, each with ``cores / n_jobs`` threads) or
``hydra/launcher=slurm`` (submitit, one cluster job per run). ``python -m
melora.sweep <spec> --profile mini --jobs 2`` is the short form, and also runs
INSTRUCTEVAL on the adapters an instruct spec trained.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from melora.specs import CONFIGS, ENTRIES, EXPERIMENTS, ROOT, RunSpec, expand, grid_lrs, load_spec  # noqa: F401 - the spec API, re-exported

log = logging.getLogger(__name__)


def with_chosen_lr(spec: dict, runs: list[RunSpec], profile: str, extra: list[str] | None = None, loader=None) -> list[RunSpec]:
    """Runs of an ``lr_from: <grid spec>`` spec, each at the lr chosen on validation from the grid's runs.

    A run whose (task, row, setting) grid is not complete yet (every lr at every
    grid seed) is left out with a message: run the grid spec first.
    """
    from omegaconf import OmegaConf

    from melora.report.protocol import choose, collect, row_of, setting_of
    from melora.report.records import load_records

    grid = load_spec(spec["lr_from"])
    lrs, grid_seeds = grid_lrs(grid), set(grid["profiles"][profile]["seeds"])
    chosen: dict[tuple, float | None] = {}
    out, waiting, cells = [], 0, None
    for run in runs:
        cfg = compose_run(run, extra, loader)
        if cells is None:
            root = Path(cfg.runs_root) / profile
            cells = collect(load_records(root))[0] if root.is_dir() else {}
        node = OmegaConf.to_container(cfg.method, resolve=True)
        mc = {"method": node.pop("name"), **{k: v for k, v in node.items() if k != "tag"}}
        key = (cfg.task.name, row_of(mc), setting_of(mc))
        if key not in chosen:
            options = {k: v for k, v in cells.items() if k[:3] == key and k[3] in lrs}
            complete = len(options) == len(lrs) and all(grid_seeds <= set(val.seeds) for val, _ in options.values())
            choice = choose(options, key[0], key[1]) if complete else None
            chosen[key] = choice.lr if choice else None
        if chosen[key] is None:
            waiting += 1
            continue
        out.append(RunSpec(run.entry, [*run.overrides, f"task.lr={chosen[key]:g}"]))
    if waiting:
        print(f"{spec['name']}: {waiting} runs wait for their lr grid ({spec['lr_from']}) to complete", flush=True)
    return out


def grid_key(config: dict) -> str:
    """What a learning-rate grid varies over: the hash of a resolved run config without its lr, seed and folder."""
    from melora.runs import config_hash

    keep = {k: v for k, v in config.items() if k not in ("seed", "run_dir")}
    keep["task"] = {k: v for k, v in (keep.get("task") or {}).items() if k != "lr"}
    if isinstance(keep.get("selection"), dict):
        keep["selection"] = {k: v for k, v in keep["selection"].items() if k != "folder"}
    return config_hash(keep)


def _override(run: RunSpec, key: str) -> str:
    return next(o for o in reversed(run.overrides) if o.startswith(f"{key}=")).partition("=")[2]


def _run_seed(run: RunSpec) -> int:
    return int(_override(run, "seed"))


def _run_lr(run: RunSpec) -> float:
    return float(_override(run, "task.lr"))


def with_bracketing_lrs(spec: dict, runs: list[RunSpec], profile: str, extra: list[str] | None = None, loader=None,
                        report: dict | None = None) -> list[RunSpec]:
    """Runs of an ``lr_bracket:`` spec: its grid, plus each setting's extension where the best lr is at an edge.

    A setting (the runs that differ only in lr and seed) whose best mean
    validation metric over seeds sits at an edge of the lrs it has records for
    gets its next lr on the 1-3 ladder, at every seed of the spec
    (:func:`melora.report.bracket.bracket`). One step per call: the sweep
    calls it again once those runs are done. ``report``, when given, is filled
    with each setting's :class:`~melora.report.bracket.Bracket`.
    """
    from omegaconf import OmegaConf

    from melora.report.bracket import bracket
    from melora.report.records import load_records, selection_of

    limits = spec["lr_bracket"]
    by_key: dict[str, list[RunSpec]] = {}
    root = None
    for run in runs:
        cfg = compose_run(run, extra, loader)
        root = root or Path(cfg.runs_root) / profile
        by_key.setdefault(grid_key(OmegaConf.to_container(cfg, resolve=True)), []).append(run)
    values: dict[str, dict[float, dict[int, float | None]]] = {}
    if root is not None and root.is_dir():
        for r in load_records(root):
            if r.get("kind") != "glue" or selection_of(r) != "dev_halves" or "config" not in r:
                continue
            key = grid_key(r["config"])
            if key not in by_key or not (r.get("status") == "completed" or r.get("diverged")):
                continue
            value = r.get("best_metric") if r.get("status") == "completed" else None
            values.setdefault(key, {}).setdefault(float(r["config"]["task"]["lr"]), {})[int(r["seed"])] = value
    out = list(runs)
    for key, key_runs in by_key.items():
        grid = {_run_lr(r) for r in key_runs}
        tried = {lr: {} for lr in grid} | values.get(key, {})
        state = bracket(tried, limits.get("min_lr", 1e-5), limits.get("max_lr", 0.3))
        if report is not None:
            report[key] = (key_runs[0], state)
        added = sorted(set(tried) - grid) + ([state.next_lr] if state.status == "extend" else [])
        templates = [r for r in key_runs if _run_lr(r) == _run_lr(key_runs[0])]  # one run per seed
        for lr in added:
            out += [RunSpec(t.entry, [o if not o.startswith("task.lr=") else f"task.lr={lr:g}" for o in t.overrides]) for t in templates]
    return out


def expand_specs(names: list[str], profile: str, extra: list[str] | None = None, loader=None, seeds: int | None = None) -> list[RunSpec]:
    """The runs of several specs, each distinct run once (in first-seen order).

    ``seeds``: only the runs of the first ``seeds`` seeds of each spec's profile
    (a sweep runs seed waves so that a grid's extensions are found early).
    """
    runs, seen = [], set()
    for name in names:
        spec = load_spec(name)
        spec_runs = expand(spec, profile)
        if seeds is not None:
            wave = set(spec["profiles"][profile]["seeds"][:seeds])
            spec_runs = [r for r in spec_runs if _run_seed(r) in wave]
        if spec.get("lr_from"):
            spec_runs = with_chosen_lr(spec, spec_runs, profile, extra, loader)
        if spec.get("lr_bracket"):
            spec_runs = with_bracketing_lrs(spec, spec_runs, profile, extra, loader)
        for run in spec_runs:
            key = (run.entry, frozenset(run.overrides))
            if key not in seen:
                seen.add(key)
                runs.append(run)
    return runs


def compose(config_name: str, overrides: list[str], loader=None):
    """The resolved config ``config_name`` + ``overrides`` would run with, ``run_dir`` set from Hydra's run dir pattern.

    ``loader``: the config loader of a running Hydra app (the sweeper's), which
    cannot compose through ``hydra.initialize_config_dir``.
    """
    from omegaconf import OmegaConf

    if loader is None:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    else:
        from hydra.types import RunMode

        cfg = loader.load_configuration(config_name=config_name, overrides=overrides, run_mode=RunMode.RUN)
    run_dir = cfg.hydra.run.dir
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    cfg.run_dir = run_dir
    return cfg


def compose_run(run: RunSpec, extra: list[str] | None = None, loader=None):
    """The resolved config of ``run`` (plus ``extra`` overrides), with its ``run_dir``."""
    return compose(ENTRIES[run.entry], [*run.overrides, *(extra or [])], loader)


def evaluate_run(train_cfg, adapter_dir: str | None) -> dict:
    """INSTRUCTEVAL of an instruct run's adapter (or of the base model: ``adapter_dir=None``).

    Composed from ``configs/instructeval.yaml`` with the training run's profile,
    model and runs root; a finished evaluation is skipped by ``evaluate_instruct``.
    """
    from melora.instructeval import evaluate_instruct

    overrides = [
        f"profile={train_cfg.profile.name}",
        f"model={train_cfg.model.name}",
        f"runs_root={train_cfg.runs_root}",
        f"adapter_dir={adapter_dir if adapter_dir else 'null'}",
    ]
    return evaluate_instruct(compose("instructeval", overrides))


def run_completed(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a record of a finished training."""
    from melora.runs import read_record

    record = read_record(run_dir)
    return record is not None and record.get("status") == "completed"


def run_diverged(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a run that diverged: final, not trained again (a grid reads it as collapsed)."""
    from melora.runs import read_record

    record = read_record(run_dir)
    return record is not None and bool(record.get("diverged"))


def run_finished(run_dir: str) -> bool:
    """Completed or diverged: nothing more to train."""
    return run_completed(run_dir) or run_diverged(run_dir)


def _job_threads(sweeper) -> int | None:
    """Threads per job of a local launcher (``cores / n_jobs``); ``None`` for cluster launchers."""
    if sweeper.threads_per_job:
        return sweeper.threads_per_job
    n_jobs = sweeper.config.hydra.launcher.get("n_jobs")
    if n_jobs is None:
        return None
    return max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 0 else 1  # n_jobs <= 0: joblib's one job per core


def sweep_specs(sweeper, arguments: list[str]) -> list:
    """The ``spec`` sweeper's work: expand the specs, skip complete runs, launch the rest.

    Args:
        sweeper: ``hydra_plugins.melora_sweeper.spec_sweeper.SpecSweeper`` after ``setup``.
        arguments: The command line's overrides, added to every run.

    Returns:
        The launcher's ``JobReturn`` per launched run. Exits with status 1 after
        the sweep if a run failed, naming each failed run's folder.
    """
    from hydra.core.utils import JobStatus

    config, loader = sweeper.config, sweeper.hydra_context.config_loader
    entry = next((e for e, name in ENTRIES.items() if name == config.hydra.job.config_name), None)
    names = ",".join(Path(s).stem for s in sweeper.specs)
    runs = expand_specs(sweeper.specs, sweeper.profile, arguments, loader=loader, seeds=getattr(sweeper, "seeds", None))
    others = sorted({r.entry for r in runs} - {entry})
    if others:
        raise ValueError(f"spec(s) {names} hold runs of melora.{others[0]}, not of this entry: use python -m melora.sweep {names} --profile {sweeper.profile}")
    todo = []
    for run in runs:
        run_dir = compose_run(run, arguments, loader).run_dir
        if not run_finished(run_dir):
            todo.append((run, run_dir))
    print(f"{names} ({sweeper.profile}): {len(runs)} runs, {len(runs) - len(todo)} complete, {len(todo)} to run", flush=True)
    if sweeper.list_only or not todo:
        for run, run_dir in todo:
            print(f"  {run}  ->  {run_dir}")
        return []
    threads = _job_threads(sweeper)
    if threads:  # the launcher's worker processes read it when torch starts; this process is job 0 at n_jobs=1
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    start = time.time()
    results = sweeper.launcher.launch([[*run.overrides, *arguments] for run, _ in todo], initial_job_idx=0)
    outcome: dict[str, list[str]] = {"completed": [], "diverged": [], "locked": [], "failed": []}
    for (run, run_dir), result in zip(todo, results):
        if run_diverged(run_dir):  # a learning rate too large for the setting: a result, not a failure
            outcome["diverged"].append(run_dir)
        elif result.status == JobStatus.FAILED:
            outcome["failed"].append(f"{run_dir}: {type(result._return_value).__name__}: {result._return_value}")
        else:  # an entry returns normally for a completed run or for one another process holds
            outcome["completed" if run_completed(run_dir) else "locked"].append(run_dir)
    print(f"{names}: {', '.join(f'{len(v)} {k}' for k, v in outcome.items())} in {(time.time() - start) / 60:.1f} min", flush=True)
    for folder in outcome["diverged"]:
        print(f"  diverged (kept as collapsed, not retried): {folder}")
    for folder in outcome["locked"]:
        print(f"  locked (another process trains it): {folder}")
    for line in outcome["failed"]:
        print(f"  FAILED: {line}")
    if outcome["failed"]:
        raise SystemExit(1)
    return results


def call_in_group(command: list[str], cwd: Path | str | None = None, grace_s: float = 30.0) -> int:
    """``subprocess.call(command)`` in a process group of its own, stopped as a whole with this process.

    Hydra's joblib launcher trains in loky worker processes that outlive their
    parent when it is killed; a SIGTERM or SIGINT to this process is passed to
    the child's whole group (workers included), and after ``grace_s`` seconds
    the group is killed. Returns the child's exit status.
    """
    proc = subprocess.Popen(command, cwd=cwd, start_new_session=True)

    def stop(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        # The workers may outlive the group's leader by a moment: take the rest of the group down too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def spec_cost(name: str, profile: str, extra: list[str] | None = None) -> dict:
    """What one spec has cost so far: its runs, how many are complete, their summed and median run time.

    Read from the records under the runs folder ``extra`` points at (``runs_root=…``). A
    ``lr_from`` spec counts only the runs whose lr its grid has chosen (``waiting``: the others).
    Returns ``{"spec", "runs", "complete", "waiting", "summed_min", "median_min"}``.
    """
    import io
    import statistics

    from melora.runs import read_record

    spec = load_spec(name)
    every = expand(spec, profile)
    with contextlib.redirect_stdout(io.StringIO()):  # with_chosen_lr prints what waits for its grid
        runs = expand_specs([name], profile, extra)
    minutes = []
    for run in runs:
        record = read_record(compose_run(run, extra).run_dir)
        if record is not None and record.get("status") == "completed" and record.get("wall_time_s") is not None:
            minutes.append(record["wall_time_s"] / 60)
    return {"spec": name, "runs": len(every), "complete": len(minutes), "waiting": len(every) - len(runs),
            "summed_min": sum(minutes), "median_min": statistics.median(minutes) if minutes else None}


def cost_table(names: list[str], profile: str, extra: list[str] | None = None) -> str:
    """A Markdown table of :func:`spec_cost` for each spec (runs shared between specs count in each)."""
    lines = ["| spec | runs | complete | waiting for their lr grid | summed run time | median per run |", "|---|--:|--:|--:|--:|--:|"]
    for name in names:
        c = spec_cost(name, profile, extra)
        median = f"{c['median_min']:.1f} min" if c["median_min"] is not None else "—"
        lines.append(f"| {name} | {c['runs']} | {c['complete']} | {c['waiting']} | {c['summed_min'] / 60:.1f} h | {median} |")
    return "\n".join(lines) + "\n"


def pending(names: list[str], profile: str, extra: list[str] | None = None, seeds: int | None = None) -> list[str]:
    """Run folders of the specs' runs (of the first ``seeds`` seeds) that are not finished yet."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        runs = expand_specs(names, profile, extra, seeds=seeds)
    return [d for d in (compose_run(run, extra).run_dir for run in runs) if not run_finished(d)]


def run_waves(command: list[str], specs: list[str], profile: str, extra: list[str] | None = None) -> int:
    """Run the sweep ``command``; for ``lr_bracket`` specs, in seed waves until every grid brackets.

    Wave k runs the first k seeds of every spec, again and again while a round
    adds runs (a grid whose best lr sits at an edge gets its next lr), so the
    grids are extended on the first seeds before the later seeds run. Stops
    early when a round leaves the same runs unfinished (failed or locked).
    Returns the first non-zero exit status, else 0.
    """
    bracketing = [load_spec(name) for name in specs if load_spec(name).get("lr_bracket")]
    waves = range(1, max(len(s["profiles"][profile]["seeds"]) for s in bracketing) + 1) if bracketing else [None]
    status = 0
    for wave in waves:
        before = None
        while True:
            wave_command = command + ([f"hydra.sweeper.seeds={wave}"] if wave is not None else [])
            print(" ".join(wave_command), flush=True)
            status = call_in_group(wave_command, cwd=ROOT) or status
            if wave is None:
                return status
            left = pending(specs, profile, extra, seeds=wave)
            if not left:
                break
            if left == before:
                print(f"seed wave {wave}: {len(left)} runs stay unfinished (failed or locked); stopping", flush=True)
                return status or 1
            before = left
    return status


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run the runs an experiment spec needs (skipping complete ones) as a Hydra multirun.")
    parser.add_argument("spec", help="experiments/<spec>.yaml name or a path; several: comma-separated (table2,table4)")
    parser.add_argument("--profile", default="mini", help="paper | mini | smoke")
    parser.add_argument("--list", action="store_true", help="print the runs and exit")
    parser.add_argument("--cost", action="store_true", help="print each spec's complete runs and their summed run time, and exit")
    parser.add_argument("--jobs", type=int, default=1, help="local worker processes (each gets cores/jobs threads)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per local job (default: cores / jobs)")
    parser.add_argument("--launcher", default="local", help="hydra/launcher: local (joblib, --jobs processes) | slurm | any other")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. runs_root=…)")
    args = parser.parse_intermixed_args(argv)
    names = args.spec.split(",")
    if args.list:
        for run in expand_specs(names, args.profile, args.overrides):
            print(run)
        return 0
    if args.cost:
        print(cost_table(names, args.profile, args.overrides), end="")
        return 0
    by_entry: dict[str, list[str]] = {}
    for name in names:
        by_entry.setdefault(load_spec(name)["entry"], []).append(name)
    status = 0
    for entry, specs in by_entry.items():
        runs = expand_specs(specs, args.profile, args.overrides) if entry == "instruct" else []
        if runs:  # the base model's row of Tables 3 and 5, before the adapters
            evaluate_run(compose_run(runs[0], args.overrides), adapter_dir=None)
        command = [sys.executable, "-m", f"melora.{entry}", "-m", "hydra/sweeper=spec", f"hydra.sweeper.specs=[{','.join(specs)}]",
                   f"hydra.sweeper.profile={args.profile}", f"hydra/launcher={args.launcher}",
                   *([f"hydra.launcher.n_jobs={args.jobs}"] if args.launcher == "local" else []),
                   *([f"hydra.sweeper.threads_per_job={args.threads}"] if args.threads else []), *args.overrides]  # fmt: skip
        status = run_waves(command, specs, args.profile, args.overrides) or status
        for run in runs:  # INSTRUCTEVAL of every trained adapter (a finished evaluation is skipped)
            cfg = compose_run(run, args.overrides)
            if run_completed(cfg.run_dir):
                evaluate_run(cfg, adapter_dir=cfg.run_dir)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
