"""Held-out model selection: the split, its use in training, and the identity of older runs."""

import json
from pathlib import Path

import pytest
from datasets import Dataset
from hydra import compose, initialize_config_dir
from test_glue_pipeline import CONFIGS, data_dir, train_in_process

from melora.experiments.data.glue import heldout_split


def test_heldout_split_size_disjoint_and_deterministic():
    ds = Dataset.from_dict({"i": list(range(3000))})
    train, held, info = heldout_split(ds, fraction=0.1, min_examples=200, seed=4321)
    assert len(held) == 300 and len(train) == 2700 == info["train_size"] and info["size"] == 300
    assert not set(train["i"]) & set(held["i"]) and set(train["i"]) | set(held["i"]) == set(range(3000))
    again = heldout_split(ds, fraction=0.1, min_examples=200, seed=4321)
    assert again[1]["i"] == held["i"] and again[2]["indices_sha256"] == info["indices_sha256"]
    assert heldout_split(ds, 0.1, 200, seed=1)[1]["i"] != held["i"]
    small = heldout_split(Dataset.from_dict({"i": list(range(1000))}), 0.1, 200, seed=0)
    assert len(small[1]) == 200  # the floor: a 100-example split would pick too noisily


def test_heldout_split_refuses_to_eat_the_training_set():
    with pytest.raises(ValueError, match="selection.min_examples"):
        heldout_split(Dataset.from_dict({"i": list(range(300))}), 0.1, 200, seed=0)
    with pytest.raises(ValueError, match="selection.fraction"):
        heldout_split(Dataset.from_dict({"i": list(range(300))}), 1.5, 10, seed=0)


def compose_glue(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=["profile=mini", "run_dir=/tmp/unused", *overrides])


def test_same_split_for_every_method_and_seed_disjoint_from_train_and_dev():
    from melora.experiments.glue import prepare_glue_data
    from melora.experiments.models import load_tokenizer

    data_dir()
    splits = []
    for overrides in (["method=lora", "seed=0"], ["method=melora", "method.n=8", "method.r=1", "seed=3", "task.lr=3e-3"]):
        cfg = compose_glue(["task=glue/mrpc", "selection=heldout", *overrides])
        train, evals, info, _ = prepare_glue_data(cfg, load_tokenizer(cfg.model))
        splits.append((train, evals, info))
    (train, evals, info), (train2, evals2, info2) = splits
    assert info == info2 and info["size"] == 240 and len(train) == 2160 == info["train_size"]
    assert evals["heldout"]["input_ids"] == evals2["heldout"]["input_ids"]
    assert train["input_ids"] == train2["input_ids"]
    pairs = lambda ds: {tuple(ids) for ids in ds["input_ids"]}  # noqa: E731
    assert not pairs(evals["heldout"]) & pairs(train)
    assert not pairs(evals["heldout"]) & pairs(evals["validation"])
    assert len(evals["validation"]) == 408  # the whole GLUE dev set is still what is reported


def test_best_epoch_is_chosen_on_heldout_and_dev_is_recorded(tmp_path):
    data_dir()
    record = train_in_process(tmp_path, "task=glue/sst2", "method=lora", "task.epochs=3", "task.lr=3e-3",
                              "selection=heldout", "selection.min_examples=16")
    assert record["selection"]["split"] == "heldout" and record["selection"]["size"] == 16
    assert record["selection_metric"] == "heldout_accuracy" and record["train_size"] == 48
    history = record["history"]
    best = max(range(len(history)), key=lambda i: (history[i]["heldout_accuracy"], -i))
    assert record["best_epoch"] == history[best]["epoch"]
    assert record["best_metric"] == history[best]["heldout_accuracy"]
    assert record["best_metrics"]["accuracy"] == history[best]["accuracy"]


def test_dev_selection_keeps_the_identity_of_older_runs():
    """A committed record from before `selection` existed is still the same run."""
    from melora.experiments.runs import config_hash
    from melora.experiments.scaffold import resolved

    path = next(Path(__file__).resolve().parents[2].glob("results/runs/mini/glue-mrpc/minilm/lora_r8/seed0/record.json"))
    record = json.loads(path.read_text())
    assert "selection" not in record["config"]
    cfg = compose_glue(["task=glue/mrpc", "method=lora", "method.r=8", "model=minilm"])
    config = resolved(cfg)
    config.update({k: record["config"][k] for k in ("data_dir", "runs_root", "run_dir") if k in record["config"]})
    assert config_hash(config) == record["config_hash"]
    heldout = resolved(compose_glue(["task=glue/mrpc", "method=lora", "method.r=8", "selection=heldout"]))
    assert config_hash(heldout) != record["config_hash"]


def test_seeds_stage_takes_the_lr_chosen_on_validation(tmp_path, monkeypatch):
    """table2_heldout runs each row at its grid's validation-best lr, and waits for incomplete grids."""
    from melora.experiments import sweep

    def fake_record(lr, val, dev):
        cfg = sweep.compose_run(sweep.RunSpec("glue", ["profile=smoke", "model=minilm", "selection=heldout",
                                                       "selection.min_examples=16", "task=glue/mrpc", "method=lora",
                                                       "method.r=8", f"task.lr={lr}", "seed=0", f"runs_root={tmp_path}"]))
        Path(cfg.run_dir).mkdir(parents=True)
        record = {"kind": "glue", "task": "mrpc", "metric": "accuracy", "status": "completed", "seed": 0,
                  "selection": {"split": "heldout"}, "method_config": {"method": "lora", "n": 1, "r": 8},
                  "config": {"task": {"lr": lr}}, "best_metric": val, "best_metrics": {"accuracy": dev}}
        (Path(cfg.run_dir) / "record.json").write_text(json.dumps(record))

    extra = [f"runs_root={tmp_path}"]
    assert sweep.expand_specs(["table2_heldout"], "smoke", extra) == []  # no grid yet: nothing to run
    fake_record(3e-4, 0.70, 0.99)
    fake_record(1e-3, 0.80, 0.50)
    assert sweep.expand_specs(["table2_heldout"], "smoke", extra) == []  # 3e-3 still missing
    fake_record(3e-3, 0.75, 0.99)
    runs = sweep.expand_specs(["table2_heldout"], "smoke", extra)
    assert len(runs) == 2 and all(r.overrides[-1] == "task.lr=0.001" for r in runs)  # LoRA only: seeds 0 and 1
    assert {o for r in runs for o in r.overrides if o.startswith("seed=")} == {"seed=0", "seed=1"}
