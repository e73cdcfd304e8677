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
          - [method=dylora, method.r=8]

``expand(spec, profile)`` gives one override list per run (the cross product of
tasks × methods × comma lists × seeds). ``run_all`` composes each run's config,
skips runs whose record is complete (a run is identified by its resolved
config), and trains the rest in this process, one after another; with
``--jobs N`` it starts N worker processes that share the missing runs, each with
``cores / N`` threads (on a small CPU, two one-thread runs side by side get more
done than one two-thread run).
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
CONFIGS = ROOT / "configs"
ENTRIES = {"glue": "config", "instruct": "instruct"}

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    entry: str
    overrides: list[str]

    def __str__(self) -> str:
        return " ".join(self.overrides)


def load_spec(name_or_path: str | Path) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = EXPERIMENTS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
        raise FileNotFoundError(f"no experiment spec {path}; known: {known}")
    return yaml.safe_load(path.read_text())


def _split_sweeps(overrides: list[str]) -> list[list[str]]:
    """``["a=1", "b=2,4"]`` → ``[["a=1", "b=2"], ["a=1", "b=4"]]``."""
    choices = []
    for o in overrides:
        key, _, value = o.partition("=")
        if "," in value and not value.startswith("["):
            choices.append([f"{key}={v.strip()}" for v in value.split(",")])
        else:
            choices.append([o])
    return [list(c) for c in itertools.product(*choices)]


def expand(spec: dict, profile: str) -> list[RunSpec]:
    """Every run the spec needs at ``profile``, as Hydra override lists."""
    if profile not in spec["profiles"]:
        raise ValueError(f"spec '{spec['name']}' has no profile '{profile}'; it has {sorted(spec['profiles'])}")
    prof = spec["profiles"][profile]
    base = [f"profile={profile}", *prof.get("overrides", [])]
    runs = []
    for group in spec["groups"]:
        if profile not in group.get("profiles", [profile]):
            continue
        tasks = group.get("tasks", prof.get("tasks", [None]))
        for task, method, seed in itertools.product(tasks, group["methods"], prof["seeds"]):
            head = [f"task={task}"] if task else []
            for combo in _split_sweeps([*method, *group.get("overrides", [])]):
                runs.append(RunSpec(spec["entry"], [*base, *head, *combo, f"seed={seed}"]))
    return runs


def grid_lrs(spec: dict) -> list[float]:
    """The learning rates a grid spec sweeps (its ``task.lr=a,b,c`` group override)."""
    for group in spec["groups"]:
        for o in group.get("overrides", []):
            if o.startswith("task.lr="):
                return [float(v) for v in o.partition("=")[2].split(",")]
    raise ValueError(f"spec '{spec['name']}' sweeps no task.lr=…; lr_from needs a learning-rate grid spec")


def with_chosen_lr(spec: dict, runs: list[RunSpec], profile: str, extra: list[str] | None = None) -> list[RunSpec]:
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
        cfg = compose_run(run, extra)
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


def expand_specs(names: list[str], profile: str, extra: list[str] | None = None) -> list[RunSpec]:
    """The runs of several specs, each distinct run once (in first-seen order)."""
    runs, seen = [], set()
    for name in names:
        spec = load_spec(name)
        spec_runs = expand(spec, profile)
        if spec.get("lr_from"):
            spec_runs = with_chosen_lr(spec, spec_runs, profile, extra)
        for run in spec_runs:
            key = (run.entry, frozenset(run.overrides))
            if key not in seen:
                seen.add(key)
                runs.append(run)
    return runs


def compose_run(run: RunSpec, extra: list[str] | None = None):
    """The resolved config of ``run``, with ``run_dir`` set from the Hydra run dir pattern."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(ENTRIES[run.entry], overrides=[*run.overrides, *(extra or [])], return_hydra_config=True)
    run_dir = cfg.hydra.run.dir
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    cfg.run_dir = run_dir
    return cfg


def train_run(entry: str, cfg) -> dict:
    if entry == "glue":
        from melora.glue import train_glue

        return train_glue(cfg)
    from melora.instruct import train_instruct
    from melora.train.runlock import is_locked

    record = train_instruct(cfg)
    if not is_locked(record):  # another process is training it: no adapter to evaluate yet
        evaluate_run(cfg, adapter_dir=cfg.run_dir)
    return record


def evaluate_run(train_cfg, adapter_dir: str | None) -> dict:
    """INSTRUCTEVAL of an instruct run's adapter (or of the base model: ``adapter_dir=None``).

    Composed from ``configs/instructeval.yaml`` with the training run's profile,
    model and runs root; a finished evaluation is skipped by ``evaluate_instruct``.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from melora.instructeval import evaluate_instruct

    overrides = [
        f"profile={train_cfg.profile.name}",
        f"model={train_cfg.model.name}",
        f"runs_root={train_cfg.runs_root}",
        f"adapter_dir={adapter_dir if adapter_dir else 'null'}",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("instructeval", overrides=overrides, return_hydra_config=True)
    run_dir = cfg.hydra.run.dir
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    cfg.run_dir = run_dir
    return evaluate_instruct(cfg)


def run_all(
    runs: list[RunSpec], extra: list[str] | None = None, keep_going: bool = True, evaluate_base: bool = True
) -> dict[str, list[str]]:
    """Train every run not yet complete; returns the run folders by outcome.

    ``evaluate_base``: evaluate the base model before the first instruct run
    (one worker of a parallel sweep does it). ``locked``: runs another process
    was training (or evaluating), left to it (not done, not failed).
    """
    from melora.train.runlock import is_locked

    outcome: dict[str, list[str]] = {"skipped": [], "completed": [], "failed": [], "locked": []}
    base_evaluated = not evaluate_base
    for i, run in enumerate(runs, 1):
        cfg = compose_run(run, extra)
        if run_completed(cfg.run_dir):
            if run.entry == "instruct":  # a finished training may still lack its evaluation
                evaluate_run(cfg, adapter_dir=cfg.run_dir)
            outcome["skipped"].append(cfg.run_dir)
            continue
        log.info("[%d/%d] %s", i, len(runs), run)
        print(f"[{i}/{len(runs)}] {run}", flush=True)
        try:
            if run.entry == "instruct" and not base_evaluated:
                evaluate_run(cfg, adapter_dir=None)  # the base model's row of Tables 3/5
                base_evaluated = True
            record = train_run(run.entry, cfg)
            outcome["locked" if is_locked(record) else "completed"].append(cfg.run_dir)
        except Exception:  # a failed run is recorded and listed, the sweep goes on
            traceback.print_exc()
            outcome["failed"].append(cfg.run_dir)
            if not keep_going:
                raise
    return outcome


def pending(runs: list[RunSpec], extra: list[str] | None = None) -> dict[int, str]:
    """Index → run folder of the runs without a completed record (instruct runs: or without their evaluation)."""
    todo = {}
    for i, run in enumerate(runs):
        run_dir = compose_run(run, extra).run_dir
        if run.entry == "instruct" or not run_completed(run_dir):
            todo[i] = run_dir
    return todo


def run_parallel(args, runs: list[RunSpec]) -> int:
    """Share the missing runs among ``args.jobs`` worker processes; returns the exit status."""
    dirs = pending(runs, args.overrides)
    todo = list(dirs)
    jobs = min(args.jobs, len(todo))
    if jobs <= 1:
        return report(run_all([runs[i] for i in todo], args.overrides))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log_dir = Path(compose_run(runs[todo[0]], args.overrides).runs_root) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    for k in range(jobs):
        share = todo[k::jobs]
        log_path = log_dir / f"{'+'.join(Path(s).stem for s in args.spec.split(','))}-{args.profile}-worker{k}.log"
        command = [sys.executable, "-m", "melora.sweep", args.spec, "--profile", args.profile,
                   "--only", ",".join(map(str, share)), *([] if k == 0 else ["--no-base-eval"]), *args.overrides]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with open(log_path, "w") as log_file:
            workers.append(subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env))
        print(f"worker {k}: {len(share)} runs, {threads} thread(s), log {log_path}", flush=True)
    done_before, start = -1, time.time()
    while any(w.poll() is None for w in workers):
        time.sleep(10)
        done = sum(run_completed(d) for d in dirs.values())
        if done != done_before:
            print(f"[{time.time() - start:6.0f} s] {done}/{len(dirs)} runs completed", flush=True)
            done_before = done
    failed = [k for k, w in enumerate(workers) if w.returncode]
    for k in failed:
        print(f"worker {k} exited with status {workers[k].returncode}; see its log", flush=True)
    return 1 if failed else 0


def run_completed(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a record of a finished training."""
    from melora.train.records import read_record

    record = read_record(run_dir)
    return record is not None and record.get("status") == "completed"


def report(outcome: dict[str, list[str]]) -> int:
    print({k: len(v) for k, v in outcome.items()})
    for folder in outcome["failed"]:
        print(f"FAILED: {folder}")
    return 1 if outcome["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run the runs an experiment spec needs (skipping complete ones).")
    parser.add_argument("spec", help="experiments/<spec>.yaml name or a path; several: comma-separated (table2,table4)")
    parser.add_argument("--profile", default="mini", help="paper | mini | smoke")
    parser.add_argument("--list", action="store_true", help="print the runs and exit")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes sharing the runs (each gets cores/jobs threads)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # a worker's share: comma-separated run indices
    parser.add_argument("--no-base-eval", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. runs_root=…)")
    args = parser.parse_intermixed_args(argv)
    runs = expand_specs(args.spec.split(","), args.profile, args.overrides)
    if args.list:
        for run in runs:
            print(run)
        return 0
    if args.only is not None:
        runs = [runs[int(i)] for i in args.only.split(",") if i]
    elif args.jobs > 1:
        return run_parallel(args, runs)
    return report(run_all(runs, args.overrides, evaluate_base=not args.no_base_eval))


if __name__ == "__main__":
    raise SystemExit(main())
