"""Per-example dev predictions at every evaluation: ``<run_dir>/predictions.safetensors``.

A record holds each evaluation's metrics; this file holds what they were
computed from, so that another selection protocol (another split of the dev
set, another metric) can be applied to finished runs without training again.

Layout: tensor ``labels`` (shape ``(N,)``, the gold labels in dataset order),
one tensor ``step<k>`` per evaluation at optimiser step ``k`` (shape ``(N,)``:
class ids as int8, or float32 scores for a regression task), and string
metadata ``format``, ``task`` and ``epochs`` (JSON ``{"<step>": epoch}``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from melora.files import atomic_save_tensors

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.safetensors"
FORMAT = "melora-dev-predictions/1"


def read_predictions(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """``(tensors, metadata)`` of a run's predictions file, ``None`` when there is none.

    Raises:
        ValueError: The file is damaged (the message names it).
    """
    from safetensors import safe_open

    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is damaged ({err}); delete it, the run's next evaluation writes it again") from err


def predictions_at(run_dir: str | Path, step: int) -> torch.Tensor | None:
    """The predictions of the evaluation at optimiser step ``step``, ``None`` when not stored."""
    found = read_predictions(run_dir)
    return None if found is None else found[0].get(f"step{step}")


def write_predictions(run_dir: str | Path, step: int, epoch: int, predictions: torch.Tensor, task: str, labels: torch.Tensor) -> None:
    """Add (or replace) the evaluation at ``step`` in the run's predictions file, atomically.

    A damaged file is replaced by one holding this evaluation only (with a
    warning): the earlier evaluations' metrics are still in the record.
    """
    try:
        found = read_predictions(run_dir)
    except ValueError as err:
        log.warning("%s; starting it again", err)
        found = None
    tensors, metadata = found if found is not None else ({}, {})
    epochs = json.loads(metadata.get("epochs", "{}"))
    tensors.update({"labels": labels.detach().cpu(), f"step{step}": predictions.detach().cpu()})
    epochs[str(step)] = epoch
    metadata = {"format": FORMAT, "task": task, "epochs": json.dumps(epochs, sort_keys=True)}
    atomic_save_tensors(tensors, Path(run_dir) / PREDICTIONS_FILE, metadata)
