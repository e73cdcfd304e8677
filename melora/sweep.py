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
config), and trains the rest in this process, one after another.
"""

from __future__ import annotations

import itertools
import logging
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

    record = train_instruct(cfg)
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


def run_all(runs: list[RunSpec], extra: list[str] | None = None, keep_going: bool = True) -> dict[str, list[str]]:
    """Train every run not yet complete; returns the run folders by outcome."""
    from melora.train.records import read_record

    outcome: dict[str, list[str]] = {"skipped": [], "completed": [], "failed": []}
    base_evaluated = False
    for i, run in enumerate(runs, 1):
        cfg = compose_run(run, extra)
        record = read_record(cfg.run_dir)
        if record is not None and record.get("status") == "completed":
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
            train_run(run.entry, cfg)
            outcome["completed"].append(cfg.run_dir)
        except Exception:  # a failed run is recorded and listed, the sweep goes on
            traceback.print_exc()
            outcome["failed"].append(cfg.run_dir)
            if not keep_going:
                raise
    return outcome


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run the runs an experiment spec needs (skipping complete ones).")
    parser.add_argument("spec", help="experiments/<spec>.yaml name or a path")
    parser.add_argument("--profile", default="mini", help="paper | mini | smoke")
    parser.add_argument("--list", action="store_true", help="print the runs and exit")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. runs_root=…)")
    args = parser.parse_intermixed_args(argv)
    runs = expand(load_spec(args.spec), args.profile)
    if args.list:
        for run in runs:
            print(run)
        return 0
    outcome = run_all(runs, args.overrides)
    print({k: len(v) for k, v in outcome.items()})
    for folder in outcome["failed"]:
        print(f"FAILED: {folder}")
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
