"""trainer.compile: torch.compile inside Trainer.fit, and a run identity that `compile: false` leaves alone."""

import copy
import json
from pathlib import Path

import torch
from conftest import tiny_bert
from hydra import compose, initialize_config_dir

import melora
from melora.adapters.base import get_method
from melora.experiments.runs import config_hash
from melora.experiments.train.trainer import Trainer, TrainerConfig

ROOT = Path(__file__).resolve().parents[2]


def compose_config(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=["run_dir=/tmp/unused", *overrides])  # run_dir is cosmetic


def test_compile_false_keeps_the_config_hash():
    from melora.experiments.scaffold import resolved

    config = resolved(compose_config(["task=glue/mrpc", "method=lora", "method.r=8", "model=minilm"]))
    assert config["trainer"]["compile"] is False
    without = copy.deepcopy(config)
    del without["trainer"]["compile"]
    assert config_hash(config) == config_hash(without)
    with_true = copy.deepcopy(config)
    with_true["trainer"]["compile"] = True
    assert config_hash(with_true) != config_hash(config)  # compiled kernels round differently: another run


def test_compile_false_keeps_the_identity_of_a_committed_run():
    """A record from before trainer.compile existed is the same run as a fresh compose of its config."""
    from melora.experiments.scaffold import resolved

    record = json.loads((ROOT / "results/runs/mini/glue-mrpc/minilm/lora_r8/seed0/record.json").read_text())
    assert "compile" not in record["config"]["trainer"]
    config = resolved(compose_config(["task=glue/mrpc", "method=lora", "method.r=8", "model=minilm"]))
    config.update({k: record["config"][k] for k in ("data_dir", "runs_root", "run_dir") if k in record["config"]})
    assert config_hash(config) == record["config_hash"]


def test_trainer_compiles_the_model_when_asked(tmp_path, monkeypatch):
    calls = []
    compile_ = torch.compile

    def aot_eager_compile(*args, **kwargs):  # the inductor default would spend a minute compiling C++ here
        calls.append(kwargs)
        return compile_(*args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    config = melora.MELoRAConfig(n=4, r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = melora.inject(tiny_bert(), config)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 120, (12,), generator=gen), "labels": torch.tensor(i % 3)} for i in range(16)]

    def collate(rows):
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    def evaluate(model, accelerator):
        with torch.no_grad():
            logits = model(**collate(data)).logits
        return {"accuracy": (logits.argmax(-1) == collate(data)["labels"]).float().mean().item()}

    trainer = Trainer(
        model=model, method=get_method(config), train_dataset=data, collate_fn=collate, evaluate=evaluate,
        main_metric="accuracy", run_dir=tmp_path,
        config=TrainerConfig(epochs=1, lr=1e-3, batch_size=4, max_steps=3, progress=False, mixed_precision="no", compile=True),
    )  # fmt: skip
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    record = trainer.fit()
    assert len(calls) == 1 and record["status"] == "completed" and record["global_step"] == 3
    assert hasattr(model, "_compiled_call_impl")  # compiled in place: the same module, the same parameter names
    after = dict(model.named_parameters())
    assert before.keys() <= after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
