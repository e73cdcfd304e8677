"""What a constant prediction scores on each task's test half: the floor the dev-halves verdicts are read against.

A difference between two adapters says little where neither is far above what
predicting one class for every example scores. The constant here is the
validation half's most frequent class (ties: the smaller class id), chosen on
the validation half like every other choice of the protocol; on the test half it
scores that class's share (accuracy) and a Matthews correlation of 0. A
correlation metric (STS-B) is 0 for any constant.

The halves are recomputed from a run's stored gold labels
(``predictions.safetensors``) and its record's split seed, and checked against the
hash of the validation indices in the record, so the floor is computed on
exactly the test half the tables report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from melora.experiments.data.glue import dev_halves
from melora.experiments.data.glue_tasks import get_task
from melora.experiments.metrics import glue_metrics
from melora.experiments.report.paper import GLUE_LABELS, GLUE_ORDER, METRIC_NAMES
from melora.experiments.report.records import selection_of
from melora.experiments.train.predictions import read_predictions

NOTE = (
    "What a constant prediction scores on each task's dev-halves test half (×100): the validation half's most frequent "
    "class for every example (ties: the smaller class id), chosen on the validation half like every choice of the protocol; "
    "a correlation (STS-B) is 0 for any constant. Where LoRA r=8 itself is close to this floor, the task was barely learned "
    "at this scale, and a verdict there says little about the adapters."
)


@dataclass(frozen=True)
class Floor:
    """A task's constant-prediction score on its test half.

    Attributes:
        task: GLUE task name (``"mrpc"``).
        metric: The table metric (``"accuracy"``).
        value: The constant's test-half metric ×100.
        prediction: What the constant predicts, in words (``"always 'equivalent'"``, ``"any constant"``).
        test_size: Examples in the test half.
    """

    task: str
    metric: str
    value: float
    prediction: str
    test_size: int


def constant_floor(task: str, labels: np.ndarray, selection: dict) -> Floor:
    """The constant prediction's test-half score for ``task``, from its dev set's gold labels.

    Args:
        task: GLUE task name.
        labels: Shape ``(N,)``: the dev set's gold class ids (or scores for STS-B), in dataset order.
        selection: A record's ``selection`` entry (``seed``, ``validation_indices_sha256``, ``score_bins`` for STS-B).

    Raises:
        ValueError: the halves recomputed from ``labels`` are not the record's (another dev set or split seed).
    """
    spec = get_task(task)
    labels = np.asarray(labels)
    validation, test, info = dev_halves(labels, selection["seed"], spec.is_regression, selection.get("score_bins", 5))
    recorded = selection.get("validation_indices_sha256")
    if recorded is not None and info["validation_indices_sha256"] != recorded:
        raise ValueError(f"{task}: the stored labels give validation indices {info['validation_indices_sha256']}, "
                         f"the record says {recorded}; the predictions file belongs to another dev set")
    metric = spec.main_metric
    if spec.is_regression:
        return Floor(task, metric, 0.0, "any constant", len(test))
    majority = int(np.bincount(labels[validation].astype(np.int64)).argmax())
    value = glue_metrics(task, np.full(len(test), majority), labels[test])[metric]
    return Floor(task, metric, 100 * value, f"always '{spec.label_names[majority].replace('_', ' ')}'", len(test))


def floors(records: list[dict]) -> dict[str, Floor]:
    """Each task's :class:`Floor` (GLUE order), from the first dev-halves record of it with a predictions file.

    Tasks without one (records exported without predictions, or synthetic ones) are left out.
    """
    out: dict[str, Floor] = {}
    for r in records:
        task = r.get("task")
        if task in out or r.get("kind") != "glue" or selection_of(r) != "dev_halves" or not r.get("run_dir"):
            continue
        found = read_predictions(Path(r["run_dir"]))
        if found is None or "labels" not in found[0]:
            continue
        out[task] = constant_floor(task, found[0]["labels"].numpy(), r["selection"])
    return dict(sorted(out.items(), key=lambda item: GLUE_ORDER.index(item[0]) if item[0] in GLUE_ORDER else 99))


def floor_rows(found: dict[str, Floor]) -> tuple[list[str], list[list[str]]]:
    """``(header, body)``: one row per task with its metric, the constant, its test-half score ×100 and the half's size."""
    header = ["task", "metric", "constant prediction", "test half ×100", "test half (examples)"]
    body = [[GLUE_LABELS.get(f.task, f.task), METRIC_NAMES.get(f.metric, f.metric), f.prediction, f"{f.value:.1f}", str(f.test_size)]
            for f in found.values()]
    return header, body


def in_words(found: dict[str, Floor]) -> str:
    """``"SST-2 50.9, MRPC 68.5, CoLA 0.0, STS-B 0.0"``: each task's floor, for a sentence."""
    return ", ".join(f"{GLUE_LABELS.get(f.task, f.task)} {f.value:.1f}" for f in found.values())
