"""Experiment specs (``experiments/<name>.yaml``): which runs a paper artifact needs, as Hydra overrides.

See ``melora.experiments.sweep`` for the format and for running them.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

PROJECT_ENV = "MELORA_PROJECT_DIR"
# The checkout the package sits in (an editable install), or the folder MELORA_PROJECT_DIR names:
# it holds configs/ (Hydra) and experiments/ (the specs), which are not part of the installed package.
ROOT = Path(os.environ.get(PROJECT_ENV) or Path(__file__).resolve().parents[2]).expanduser().resolve()
EXPERIMENTS = ROOT / "experiments"
CONFIGS = ROOT / "configs"


def require_project() -> None:
    """Check that ``configs/`` and ``experiments/`` are where the pipelines look for them.

    Raises:
        FileNotFoundError: one line that says what the pipelines need.
    """
    if not (CONFIGS / "config.yaml").is_file() or not EXPERIMENTS.is_dir():
        raise FileNotFoundError(
            f"no configs/ and experiments/ in {ROOT}: the pipelines run from a clone of the repository "
            f"(pip install -e <clone>), or set {PROJECT_ENV}=<clone> for an installed package"
        )
ENTRIES = {"glue": "config", "instruct": "instruct"}



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


