"""The constant-prediction floor: what one class for every example scores on each task's test half."""

import collections

import numpy as np
import pytest
import torch
from sklearn.metrics import matthews_corrcoef

from melora.experiments.data.glue import dev_halves
from melora.experiments.report import verdicts
from melora.experiments.report.chance import NOTE, constant_floor, floor_rows, floors
from melora.experiments.report.headline import headline
from melora.experiments.train.predictions import write_predictions


def shuffled(counts: dict[int, int], seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(k, c) for c, k in counts.items()])
    return labels[np.random.default_rng(seed).permutation(len(labels))]


def selection_of_split(labels, seed=20240227, regression=False) -> dict:
    return dev_halves(labels, seed, regression)[2]


def test_accuracy_floor_is_the_validation_majority_share_of_the_test_half():
    labels = shuffled({0: 130, 1: 278})
    validation, test, info = dev_halves(labels, 20240227)
    majority = collections.Counter(labels[validation].tolist()).most_common(1)[0][0]
    floor = constant_floor("mrpc", labels, info)
    assert floor.value == pytest.approx(100 * np.mean(labels[test] == majority))
    assert floor.prediction == "always 'equivalent'" and floor.metric == "accuracy" and floor.test_size == len(test)


def test_matthews_floor_is_zero_and_correlations_of_a_constant_are_zero():
    labels = shuffled({0: 300, 1: 743})
    floor = constant_floor("cola", labels, selection_of_split(labels))
    _, test, _ = dev_halves(labels, 20240227)
    assert floor.value == pytest.approx(100 * matthews_corrcoef(labels[test], np.ones(len(test), dtype=int))) == 0.0
    scores = np.random.default_rng(1).uniform(0, 5, 300)
    stsb = constant_floor("stsb", scores, selection_of_split(scores, regression=True))
    assert (stsb.value, stsb.prediction, stsb.metric) == (0.0, "any constant", "pearson")


def test_a_validation_tie_goes_to_the_smaller_class():
    labels = shuffled({0: 100, 1: 100})  # each class splits 50 / 50: the validation half ties
    assert constant_floor("sst2", labels, selection_of_split(labels)).prediction == "always 'negative'"


def test_labels_of_another_dev_set_are_refused():
    labels = shuffled({0: 130, 1: 278})
    info = selection_of_split(shuffled({0: 130, 1: 278}, seed=5))
    with pytest.raises(ValueError, match="another dev set"):
        constant_floor("mrpc", labels, info)


def run_record(tmp_path, task, labels, name="run", regression=False):
    folder = tmp_path / name
    folder.mkdir()
    dtype = torch.float32 if regression else torch.int8
    write_predictions(folder, 10, 1, torch.zeros(len(labels), dtype=dtype), task, torch.as_tensor(labels, dtype=dtype))
    return {"kind": "glue", "task": task, "run_dir": str(folder), "selection": selection_of_split(labels, regression=regression)}


def test_floors_read_one_run_per_task_in_glue_order_and_skip_runs_without_predictions(tmp_path):
    sst2, mrpc = shuffled({0: 428, 1: 444}), shuffled({0: 129, 1: 279})
    records = [run_record(tmp_path, "mrpc", mrpc, "a"), {"kind": "glue", "task": "cola", "selection": {"split": "dev_halves", "seed": 1}},
               run_record(tmp_path, "sst2", sst2, "b"), run_record(tmp_path, "mrpc", mrpc, "c")]
    found = floors(records)
    assert list(found) == ["sst2", "mrpc"]
    header, body = floor_rows(found)
    assert header[3] == "test half ×100" and body[1][:3] == ["MRPC", "accuracy", "always 'equivalent'"]
    assert "most frequent class" in NOTE


def test_the_headline_gives_lora_and_the_floor_for_scale(tmp_path):
    (tmp_path / "table2_verdicts.csv").write_text(
        "method,task,chosen,lr,lr at grid edge,lrs tried,seeds,validation,test mean ± std,test 95% CI,Δ vs LoRA r=8 (paired),Δ 95% CI,verdict\n"
        'LoRA r=8,SST-2,-,3e-3,—,"1e-3, 3e-3, 1e-2",5,82.5,80.8 ± 0.2,"[79.4, 82.3]",—,—,reference\n'
        'MELoRA r=1,SST-2,n=8,3e-3,—,"1e-3, 3e-3, 1e-2",5,81.0,79.0 ± 0.5,"[78.0, 80.0]",-1.8,"[-3.0, -0.6]",worse\n')
    assert "For scale" not in headline(tmp_path)
    (tmp_path / "constant_prediction.csv").write_text(
        "task,metric,constant prediction,test half ×100,test half (examples)\nSST-2,accuracy,always 'positive',50.9,436\n")
    assert "LoRA r=8 at its chosen lr scores SST-2 80.8; predicting the validation half's most frequent class" in headline(tmp_path)
    assert "for every example scores SST-2 50.9 " in headline(tmp_path)
    assert "not learned" not in headline(tmp_path)


def test_the_headline_says_where_lora_cannot_be_told_from_a_constant_prediction(tmp_path):
    (tmp_path / "table2_verdicts.csv").write_text(
        "method,task,chosen,lr,lr at grid edge,lrs tried,seeds,validation,test mean ± std,test 95% CI,Δ vs LoRA r=8 (paired),Δ 95% CI,verdict\n"
        'LoRA r=8,SST-2,-,3e-3,—,"1e-3, 3e-3, 1e-2",5,82.5,80.8 ± 0.2,"[79.4, 82.3]",—,—,reference\n'
        'LoRA r=8,CoLA,-,1e-3,—,"1e-3, 3e-3, 1e-2",5,12.1,5.4 ± 6.7,"[-2.9, 13.7]",—,—,reference\n'
        'MELoRA r=1,CoLA,n=8,3e-3,—,"1e-3, 3e-3, 1e-2",5,11.3,1.3 ± 6.2,"[-6.4, 9.1]",-4.1,"[-16.7, 8.6]",no detectable difference\n')
    (tmp_path / "constant_prediction.csv").write_text(
        "task,metric,constant prediction,test half ×100,test half (examples)\nSST-2,accuracy,always 'positive',50.9,436\n"
        "CoLA,Matthews corr.,always 'acceptable',0.0,521\n")
    text = headline(tmp_path)
    assert "On CoLA, LoRA r=8's 95 % interval over seeds [-2.9, 13.7] contains the constant prediction's score" in text
    assert "On SST-2" not in text


def test_the_lr_figure_draws_the_floor_only_near_the_curves():
    from test_verdicts import grid

    from melora.experiments.report.chance import Floor

    lines = verdicts.curves(grid(tasks=("sst2",), tags=("lora_r8", "melora_n8_r1")), "sst2")
    means = [c.test_mean(lr) for c in lines.values() for lr in c.points]
    near = verdicts.lr_figure(lines, "sst2", "accuracy", Floor("sst2", "accuracy", min(means) - 0.1, "always 'positive'", 436))
    assert [line.get_ydata()[0] for line in near.axes[0].get_lines() if line.get_gid() == "constant"] == [min(means) - 0.1]
    far = verdicts.lr_figure(lines, "sst2", "accuracy", Floor("sst2", "accuracy", -50.0, "always 'positive'", 436))
    assert not [line for line in far.axes[0].get_lines() if line.get_gid() == "constant"]
    assert "scores -50.0." in far.get_supxlabel() and "always 'positive'" in far.get_supxlabel().replace("\n", " ")
