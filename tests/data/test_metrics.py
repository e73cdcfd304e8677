"""Tests for melora.experiments.metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from melora.experiments.metrics import glue_metrics, main_metric

# One confusion matrix reused below (positive class = 1):
#   refs  = [1, 0, 0, 1, 1]
#   preds = [1, 1, 0, 0, 1]
#   TP = 2 (positions 0, 4), FP = 1 (position 1), TN = 1 (position 2), FN = 1 (position 3)
REFS = [1, 0, 0, 1, 1]
PREDS = [1, 1, 0, 0, 1]


def test_accuracy_tasks():
    # 3 of 4 correct -> 0.75
    for task in ("sst2", "qnli", "rte"):
        assert glue_metrics(task, [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}


def test_mnli_three_classes_and_aliases():
    # correct at positions 0, 1, 3 -> 3/5 = 0.6
    preds, refs = [0, 1, 2, 2, 1], [0, 1, 1, 2, 0]
    for task in ("mnli", "mnli-mm", "mnli_mismatched", "MNLI"):
        assert glue_metrics(task, preds, refs) == {"accuracy": pytest.approx(0.6)}


def test_mrpc_qqp_accuracy_and_f1():
    # accuracy = (TP + TN) / 5 = 3/5 = 0.6
    # precision = TP / (TP + FP) = 2/3, recall = TP / (TP + FN) = 2/3
    # F1 = 2 * P * R / (P + R) = 2/3
    for task in ("mrpc", "qqp"):
        out = glue_metrics(task, PREDS, REFS)
        assert set(out) == {"accuracy", "f1"}
        assert out["accuracy"] == pytest.approx(0.6)
        assert out["f1"] == pytest.approx(2 / 3)


def test_f1_is_for_the_positive_class():
    # refs [0, 0, 1], preds [0, 0, 0]: TP = 0 -> F1 = 0 although accuracy = 2/3
    out = glue_metrics("mrpc", [0, 0, 0], [0, 0, 1])
    assert out == {"accuracy": pytest.approx(2 / 3), "f1": 0.0}


def test_cola_matthews():
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #     = (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert glue_metrics("cola", PREDS, REFS) == {"matthews_correlation": pytest.approx(1 / 6)}


def test_cola_constant_prediction_is_zero():
    # A denominator factor (TP+FP) is 0; GLUE/sklearn define MCC as 0 here.
    assert glue_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0]) == {"matthews_correlation": 0.0}


def test_stsb_pearson_and_spearman():
    # x = [1, 2, 3, 4], y = [1, 2, 3, 10]
    # dx = [-1.5, -0.5, 0.5, 1.5] (mean 2.5), dy = [-3, -2, -1, 6] (mean 4)
    # sum(dx*dy) = 4.5 + 1 - 0.5 + 9 = 14; sum(dx^2) = 5; sum(dy^2) = 50
    # pearson = 14 / sqrt(5 * 50) = 14 / sqrt(250) = 0.885438...
    # ranks of y are [1, 2, 3, 4] = ranks of x -> spearman = 1
    out = glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 10.0])
    assert out["pearson"] == pytest.approx(14 / math.sqrt(250))
    assert out["spearmanr"] == pytest.approx(1.0)


def test_stsb_accepts_column_vector():
    # x = [1, 2, 3], y = [1, 3, 2]: dx = [-1, 0, 1], dy = [-1, 1, 0]
    # pearson = (1 + 0 + 0) / sqrt(2 * 2) = 0.5, and spearman too (ranks = values)
    out = glue_metrics("STS-B", np.array([[1.0], [2.0], [3.0]]), [1.0, 3.0, 2.0])
    assert out == {"pearson": pytest.approx(0.5), "spearmanr": pytest.approx(0.5)}


def test_logits_are_argmaxed():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [5.0, 4.0]])  # -> [0, 1, 0]
    assert glue_metrics("sst2", logits, [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}


def test_values_are_python_floats():
    out = glue_metrics("mrpc", PREDS, REFS)
    assert all(type(v) is float for v in out.values())


@pytest.mark.parametrize(
    ("preds", "refs", "match"),
    [([1, 0], [1], "2 predictions but 1 references"), ([], [], "at least one")],
)
def test_bad_lengths(preds, refs, match):
    with pytest.raises(ValueError, match=match):
        glue_metrics("rte", preds, refs)


def test_stsb_rejects_multi_column_predictions():
    with pytest.raises(ValueError, match="shape"):
        glue_metrics("stsb", np.zeros((3, 2)), [1.0, 2.0, 3.0])


def test_unknown_task():
    with pytest.raises(KeyError, match="Unknown GLUE task"):
        glue_metrics("wnli2", [1], [1])


def test_main_metric():
    assert {t: main_metric(t) for t in ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")} == {
        "mnli": "accuracy",
        "sst2": "accuracy",
        "mrpc": "accuracy",
        "cola": "matthews_correlation",
        "qnli": "accuracy",
        "qqp": "accuracy",
        "rte": "accuracy",
        "stsb": "pearson",
    }


def test_main_metric_is_among_returned_keys():
    for task in ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte"):
        assert main_metric(task) in glue_metrics(task, [1, 0, 1], [1, 1, 0])
    assert main_metric("stsb") in glue_metrics("stsb", [1.0, 2.0, 3.5], [1.0, 2.5, 3.0])


def test_each_task_yaml_selects_on_the_registry_metric():
    # The metric is written in the task's YAML (what a run selects on, overridable) and
    # is the first of GlueTask.metric_names (what the library reports): they must agree.
    import yaml

    from melora.experiments.data.glue_tasks import GLUE_TASKS
    from melora.experiments.specs import CONFIGS

    for name in GLUE_TASKS:
        node = yaml.safe_load((CONFIGS / "task" / "glue" / f"{name}.yaml").read_text())
        assert node["name"] == name
        assert node["metric"] == main_metric(name), name
