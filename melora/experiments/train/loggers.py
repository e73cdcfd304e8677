"""Metric loggers: wandb (offline by default, no network needed) or none."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class NullLogger:
    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """``wandb`` in offline mode unless ``mode`` says otherwise; files go to the run folder."""

    def __init__(self, run_dir: Path, config: dict, name: str, project: str = "melora", mode: str = "offline", group: str | None = None) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, name=name, group=group, config=config, dir=str(run_dir), mode=os.environ.get("WANDB_MODE", mode), reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_logger(spec: dict | None, run_dir: Path, config: dict, name: str, enabled: bool = True) -> NullLogger:
    """``spec`` is the Hydra ``logger`` node: ``{kind: wandb|none, project, mode, group}``."""
    if not enabled or not spec or spec.get("kind", "none") == "none":
        return NullLogger()
    if spec["kind"] == "wandb":
        return WandbLogger(run_dir, config, name, spec.get("project", "melora"), spec.get("mode", "offline"), spec.get("group"))
    raise ValueError(f"logger kind={spec['kind']!r} is unknown; use wandb or none")
