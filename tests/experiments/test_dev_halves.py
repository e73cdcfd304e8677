"""The dev-halves protocol: the split of the dev set, runs that record both halves and their predictions."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_glue_pipeline import data_dir, train_in_process

from melora.experiments.data.glue import dev_halves
from melora.experiments.metrics import glue_metrics
from melora.experiments.train.predictions import PREDICTIONS_FILE, read_predictions, write_predictions


def test_halves_are_disjoint_cover_the_dev_set_and_are_stratified():
    labels = np.array([0] * 301 + [1] * 120 + [2] * 7)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    val, test, info = dev_halves(labels, seed=11)
    assert not set(val) & set(test) and sorted([*val, *test]) == list(range(len(labels)))
    for c in (0, 1, 2):  # each class split in half (the odd one to validation)
        k = int((labels == c).sum())
        assert (labels[val] == c).sum() == (k + 1) // 2 and (labels[test] == c).sum() == k // 2
    assert info["validation_size"] == len(val) and info["test_size"] == len(test) and info["seed"] == 11
    again = dev_halves(labels, seed=11)
    assert np.array_equal(again[0], val) and again[2]["validation_indices_sha256"] == info["validation_indices_sha256"]
    other = dev_halves(labels, seed=12)
    assert not np.array_equal(other[0], val) and other[2]["validation_indices_sha256"] != info["validation_indices_sha256"]


def test_regression_halves_are_stratified_by_score_bins():
    scores = np.random.default_rng(1).uniform(0, 5, size=1500).astype(np.float32)
    scores[:3] = 5.0  # the top score joins the last bin
    val, test, info = dev_halves(scores, seed=3, regression=True, score_bins=5)
    assert info["strata"] == "score_bins" and info["score_bins"] == 5
    bins = np.minimum((scores / 5.0 * 5).astype(int), 4)
    for b in range(5):
        k = int((bins == b).sum())
        assert (bins[val] == b).sum() == (k + 1) // 2
    assert abs(scores[val].mean() - scores[test].mean()) < 0.05


def test_split_is_the_same_in_another_process():
    labels = [i % 3 for i in range(500)]
    _, _, info = dev_halves(np.array(labels), seed=20240227)
    code = ("import numpy as np; from melora.experiments.data.glue import dev_halves; "
            f"print(dev_halves(np.array({labels}), seed=20240227)[2]['validation_indices_sha256'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == info["validation_indices_sha256"]


def test_bad_labels_name_the_problem():
    with pytest.raises(ValueError, match="at least 2 labels"):
        dev_halves(np.array([1]), seed=0)


def test_predictions_file_keeps_every_evaluation_and_survives_damage(tmp_path):
    labels = torch.tensor([0, 1, 1, 0], dtype=torch.int8)
    write_predictions(tmp_path, 8, 1, torch.tensor([0, 1, 0, 0], dtype=torch.int8), "mrpc", labels)
    write_predictions(tmp_path, 16, 2, torch.tensor([1, 1, 1, 0], dtype=torch.int8), "mrpc", labels)
    tensors, meta = read_predictions(tmp_path)
    assert set(tensors) == {"labels", "step8", "step16"} and json.loads(meta["epochs"]) == {"8": 1, "16": 2}
    assert tensors["step16"].tolist() == [1, 1, 1, 0] and meta["task"] == "mrpc"
    write_predictions(tmp_path, 16, 2, torch.tensor([0, 0, 0, 0], dtype=torch.int8), "mrpc", labels)  # a resumed run's re-evaluation
    assert read_predictions(tmp_path)[0]["step16"].tolist() == [0, 0, 0, 0]
    (tmp_path / PREDICTIONS_FILE).write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=PREDICTIONS_FILE):
        read_predictions(tmp_path)
    write_predictions(tmp_path, 24, 3, torch.tensor([1, 0, 1, 0], dtype=torch.int8), "mrpc", labels)
    assert set(read_predictions(tmp_path)[0]) == {"labels", "step24"}


@pytest.mark.parametrize("task", ["mrpc", "stsb"])
def test_a_run_chooses_its_epoch_on_the_validation_half_and_records_both_halves(tmp_path, task):
    """The recorded metrics are those of the stored predictions on the recorded halves (recomputed independently)."""
    data_dir()
    record = train_in_process(tmp_path, f"task=glue/{task}", "method=melora", "method.n=2", "method.r=2",
                              "task.epochs=3", "task.lr=3e-3", "selection=dev_halves")
    metric = record["metric"]
    assert record["selection_metric"] == f"val_{metric}" and record["selection"]["split"] == "dev_halves"
    sizes = record["eval_sizes"]
    assert sizes["val"] + sizes["test"] == sizes["validation"] == 64
    history = record["history"]
    best = max(range(len(history)), key=lambda i: (history[i][f"val_{metric}"], -i))
    assert record["best_epoch"] == history[best]["epoch"] and record["best_metric"] == history[best][f"val_{metric}"]
    assert record["best_metrics"][f"test_{metric}"] == history[best][f"test_{metric}"]
    tensors, meta = read_predictions(tmp_path)
    labels = tensors["labels"].numpy()
    val, test, info = dev_halves(labels, record["selection"]["seed"], regression=task == "stsb")
    assert info["validation_indices_sha256"] == record["selection"]["validation_indices_sha256"]
    assert json.loads(meta["epochs"]) == {str(h["step"]): h["epoch"] for h in history}
    for h in history:
        preds = tensors[f"step{h['step']}"].numpy()
        for prefix, rows in (("", slice(None)), ("val_", val), ("test_", test)):
            expected = glue_metrics(task, preds[rows], labels[rows])[metric]
            assert expected == pytest.approx(h[prefix + metric], abs=1e-6, nan_ok=True)


def test_dev_halves_runs_have_their_own_folders():
    """Every lr and epoch count of the protocol has its own folder, apart from the held-out protocol's."""
    from melora.experiments.sweep import RunSpec, compose_run

    def run_dir(*overrides):
        return compose_run(RunSpec("glue", ["profile=mini", "task=glue/mrpc", "method=lora", *overrides])).run_dir

    folder = run_dir("selection=dev_halves", "task.lr=3e-3")
    assert Path(folder).parts[-7:] == ("devhalves", "ep2", "lr0.003", "glue-mrpc", "minilm", "lora_r8", "seed0")
    assert folder != run_dir("selection=dev_halves", "task.lr=3e-3", "task.epochs=6")
    assert folder != run_dir("selection=heldout", "task.lr=3e-3")
