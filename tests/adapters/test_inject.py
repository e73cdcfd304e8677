"""Injection, freezing, describe and merge_and_unload on real transformers architectures."""

import pytest
import torch
import torch.nn as nn
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

import melora


def test_inject_bert_freezes_by_type(bert):
    cfg = melora.MELoRAConfig(n=4, r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = melora.inject(bert, cfg)
    layers = melora.adapter_layers(model)
    assert sorted(layers) == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # The layers are PEFT's MELoRA tuner layers with one adapter, PEFT's "default".
    expected = {f"{n}.melora_{p}.default" for n in layers for p in ("A", "B")} | {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    assert all(isinstance(l, melora.MELoRALayer) and isinstance(l.base_layer, nn.Linear) for l in layers.values())


def test_inject_llama_and_gpt2_conv1d(llama, gpt2):
    model = melora.inject(llama, melora.MELoRAConfig(n=8, r=1, target_modules=["q_proj", "v_proj"]))
    assert len(melora.adapter_layers(model)) == 4
    out = model(input_ids=torch.randint(0, 128, (2, 6))).logits
    assert out.shape == (2, 6, 128)

    model = melora.inject(gpt2, melora.MELoRAConfig(n=4, r=2, target_modules=["c_attn"]))
    layers = melora.adapter_layers(model)
    assert len(layers) == 2 and all(isinstance(l.base_layer, Conv1D) for l in layers.values())
    assert next(iter(layers.values())).d_out == 192


def test_regex_targets(llama):
    model = melora.inject(llama, melora.MELoRAConfig(n=2, r=1, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
    assert sorted(melora.adapter_layers(model)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_target_that_matches_nothing_lists_linear_layers(bert):
    with pytest.raises(ValueError, match=r"matched no layer; the model's linear layers are: .*attention\.self\.query"):
        melora.inject(bert, melora.MELoRAConfig(n=2, r=1, target_modules=["q_proj"]))


def test_target_that_is_not_linear(bert):
    with pytest.raises(ValueError, match=r"a BertSelfAttention, not an nn.Linear/Conv1D"):
        melora.inject(bert, melora.MELoRAConfig(n=2, r=1, target_modules=["self"]))


def test_not_divisible_error_names_the_layer():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"d_in=64 of layer 'bert.encoder.layer.0.attention.self.query' is not divisible by n=48"):
        melora.inject(model, melora.MELoRAConfig(n=48, r=1))


def test_modules_to_save_that_matches_nothing(bert):
    with pytest.raises(ValueError, match=r"modules_to_save entry 'score' matched no module"):
        melora.inject(bert, melora.MELoRAConfig(n=2, r=1, modules_to_save=["score"]))


def test_inject_twice_refused(bert):
    model = melora.inject(bert, melora.MELoRAConfig(n=2, r=1))
    with pytest.raises(ValueError, match="already has adapters"):
        melora.inject(model, melora.MELoRAConfig(n=2, r=1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=0), "n must be an integer >= 1"),
        (dict(r=-1), "r must be an integer >= 1"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
        (dict(scaling="sqrt"), "scaling='sqrt' is unknown"),
        (dict(init="xavier"), "init='xavier' is unknown"),
        (dict(target_modules=[]), "target_modules is empty"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        melora.MELoRAConfig(**kwargs)


def test_config_round_trip_and_unknown_method():
    cfg = melora.MELoRAConfig(n=4, r=2, alpha=8, modules_to_save=["classifier"])
    assert melora.config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="method='qlora' is unknown"):
        melora.config_from_dict({"method": "qlora"})
    with pytest.raises(ValueError, match=r"has no field\(s\) \['rank'\]"):
        melora.config_from_dict({"method": "melora", "rank": 3})


def test_lora_config_is_melora_with_n1():
    assert melora.LoRAConfig(r=8).n == 1
    with pytest.raises(ValueError, match="LoRA has n=1"):
        melora.LoRAConfig(n=2)


def test_describe_counts(bert):
    model = melora.inject(bert, melora.MELoRAConfig(n=4, r=2, modules_to_save=["classifier"]))
    s = melora.describe(model)
    assert len(s.layers) == 4
    assert all(l.equivalent_rank == 8 and l.trainable_params == (64 + 64) * 2 for l in s.layers)
    assert s.adapter_params == 4 * 256
    assert s.saved_module_params == 64 * 3 + 3
    assert s.trainable_params == s.adapter_params + s.saved_module_params
    assert "equivalent" not in str(s) or "eq.rank" in str(s)
    assert "trainable" in str(s)


@pytest.mark.parametrize("factory,targets", [(tiny_bert, ["query", "value"]), (tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_merge_and_unload_same_outputs(factory, targets):
    model = melora.inject(factory(), melora.MELoRAConfig(n=4, r=2, target_modules=targets))
    randomize_adapters(model)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    plain = melora.merge_and_unload(model)
    assert not melora.adapter_layers(plain)
    assert all(type(m) in (nn.Linear, Conv1D) for n, m in plain.named_modules() if n.endswith(tuple(targets)))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in factory().parameters())


def test_one_step_leaves_base_bit_identical(bert):
    frozen_before = {n: p.detach().clone() for n, p in bert.named_parameters() if not n.startswith("classifier")}
    model = melora.inject(bert, melora.MELoRAConfig(n=4, r=2, modules_to_save=["classifier"]))
    randomize_adapters(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    out = model(input_ids=torch.randint(0, 120, (4, 8)), labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in frozen_before:
            assert torch.equal(p, frozen_before[key]), name
    # and the adapter did move
    assert any(l.lora_A.grad is not None and l.lora_A.grad.abs().sum() > 0 for l in melora.adapter_layers(model).values())
