"""Save/load round trips and the PEFT LoRA export, checked against PEFT itself."""

import json

import peft
import pytest
import torch
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

import melora


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_bert(cfg):
    model = melora.inject(tiny_bert(), cfg)
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # the head must travel with the adapter
    return model


def test_save_load_round_trip_identical_logits(tmp_path):
    cfg = melora.MELoRAConfig(n=4, r=2, modules_to_save=["classifier"])
    model = trained_bert(cfg)
    ids = torch.randint(0, 120, (2, 7))
    expected = logits(model, ids)
    melora.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == "melora" and meta["config"]["n"] == 4
    assert {l["name"] for l in meta["target_layers"]} == set(melora.adapter_layers(model))
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 100_000

    loaded = melora.load_adapter(tiny_bert(), tmp_path)
    assert torch.equal(logits(loaded, ids), expected)
    assert loaded.melora_config == cfg


def test_load_onto_wrong_base_model_fails_clearly(tmp_path):
    melora.save_adapter(trained_bert(melora.MELoRAConfig(n=4, r=2)), tmp_path)
    with pytest.raises(ValueError, match=r"base model has no layer 'bert.encoder.layer.0.attention.self.query'"):
        melora.load_adapter(tiny_llama(), tmp_path)
    from transformers import BertConfig, BertForSequenceClassification

    wider = BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=3))
    with pytest.raises(ValueError, match=r"has \(d_in, d_out\)=\(96, 96\), the adapter expects \(64, 64\)"):
        melora.load_adapter(wider, tmp_path)


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="melora.save_adapter"):
        melora.load_adapter(tiny_bert(), tmp_path / "nope")


def test_saving_merged_layers_is_refused(tmp_path):
    model = trained_bert(melora.MELoRAConfig(n=2, r=1))
    next(iter(melora.adapter_layers(model).values())).merge()
    with pytest.raises(ValueError, match="unmerge"):
        melora.save_adapter(model, tmp_path)


def test_n1_equals_peft_lora_with_copied_weights():
    ours = melora.inject(tiny_llama(), melora.MELoRAConfig(n=1, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(ours)
    reference = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, layer in melora.adapter_layers(ours).items():
            target = reference.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A[0])
            target.lora_B["default"].weight.copy_(layer.lora_B[0])
    ids = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(logits(ours, ids), logits(reference, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory,targets,n,r,rule", [
    (tiny_bert, ["query", "value"], 4, 2, "per_mini"),
    (tiny_llama, ["q_proj", "v_proj"], 8, 1, "equivalent"),
    (tiny_gpt2, ["c_attn"], 4, 2, "rslora"),
])
def test_peft_export_gives_identical_logits(tmp_path, factory, targets, n, r, rule):
    saved = ["classifier"] if factory is tiny_bert else []
    model = melora.inject(factory(), melora.MELoRAConfig(n=n, r=r, scaling=rule, target_modules=targets, modules_to_save=saved))
    randomize_adapters(model)
    if saved:
        with torch.no_grad():
            model.classifier.weight.add_(1.0)
    ids = torch.randint(0, 100, (2, 7))
    expected = logits(model, ids)
    melora.export_peft_lora(model, tmp_path)
    served = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    assert peft.PeftConfig.from_pretrained(tmp_path).r == n * r
    torch.testing.assert_close(logits(served, ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [melora.DyLoRAConfig(r=4), melora.DeltaLoRAConfig(r=4)], ids=["dylora", "delta_lora"])
def test_peft_export_refuses_other_methods(tmp_path, config):
    model = melora.inject(tiny_bert(), config)
    with pytest.raises(ValueError, match=f"exactly a LoRA .*not '{config.method}'"):
        melora.export_peft_lora(model, tmp_path)
