"""GLUE evaluation metrics, computed locally with scikit-learn and SciPy.

The definitions are those of the GLUE benchmark (and of the ``glue`` metric
in Hugging Face ``evaluate``, which would have to be fetched from the hub):

* CoLA: Matthews correlation coefficient (``matthews_correlation``);
* STS-B: Pearson and Spearman correlation (``pearson``, ``spearmanr``);
* MRPC, QQP: ``accuracy`` and binary ``f1`` of the positive class (label 1,
  "equivalent"/"duplicate");
* SST-2, MNLI (matched and mismatched), QNLI, RTE: ``accuracy``.

Model selection uses :func:`main_metric`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from melora.experiments.data.glue_tasks import get_task, main_metric

__all__ = ["glue_metrics", "main_metric"]

ArrayLike = Sequence[float] | np.ndarray


def glue_metrics(task: str, predictions: ArrayLike, references: ArrayLike) -> dict[str, float]:
    """Compute the GLUE metrics of ``task``.

    Args:
        task (str): Task name (``"cola"``, ``"sst2"``, ``"mrpc"``, ``"qqp"``,
            ``"stsb"``, ``"mnli"``, ``"qnli"``, ``"rte"``; aliases such as
            ``"mnli-mm"`` or ``"SST-2"`` are accepted).
        predictions (ArrayLike): Class ids of shape ``(n,)``, or logits of shape
            ``(n, num_labels)`` (arg-maxed here); for STS-B float scores of
            shape ``(n,)`` or ``(n, 1)``.
        references (ArrayLike): Gold label ids, or gold scores for STS-B.

    Returns:
        dict[str, float]: Metric name -> value, keys as listed in the module
        docstring. Correlations of a constant input are ``nan``.

    Raises:
        ValueError: If the inputs are empty or their lengths differ.
    """
    spec = get_task(task)
    if spec.is_regression:
        preds = _as_scores(predictions)
        refs = np.asarray(references, dtype=np.float64).reshape(-1)
        _check_lengths(preds, refs)
        return {"pearson": float(pearsonr(preds, refs)[0]), "spearmanr": float(spearmanr(preds, refs)[0])}
    preds = _as_class_ids(predictions)
    refs = np.asarray(references).reshape(-1).astype(np.int64)
    _check_lengths(preds, refs)
    if spec.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}
    result = {"accuracy": float(accuracy_score(refs, preds))}
    if "f1" in spec.metric_names:
        result["f1"] = float(f1_score(refs, preds, pos_label=1, average="binary", zero_division=0.0))
    return result


def _as_class_ids(predictions: ArrayLike) -> np.ndarray:
    """Turn class ids or a logit matrix into a 1-D array of class ids."""
    arr = np.asarray(predictions)
    if arr.ndim == 2:
        return arr.argmax(axis=-1).astype(np.int64)
    return arr.reshape(-1).astype(np.int64)


def _as_scores(predictions: ArrayLike) -> np.ndarray:
    """Turn ``(n,)`` or ``(n, 1)`` regression outputs into a 1-D float array."""
    arr = np.asarray(predictions, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] != 1:
        raise ValueError(f"STS-B predictions must have shape (n,) or (n, 1), got {arr.shape}.")
    return arr.reshape(-1)


def _check_lengths(preds: np.ndarray, refs: np.ndarray) -> None:
    """Reject empty or mismatched inputs, which sklearn reports obscurely."""
    if len(preds) == 0:
        raise ValueError("glue_metrics needs at least one example.")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references.")
