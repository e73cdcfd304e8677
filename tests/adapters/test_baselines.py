"""Defining behaviour of the baselines: DyLoRA, Delta-LoRA, AdaLoRA."""

import pytest
import torch
import torch.nn as nn
from conftest import tiny_bert

import melora
from melora.adapters.dylora import DyLoRAMethod


def dylora_layer(frozen=False):
    torch.manual_seed(0)
    layer = melora.DyLoRALinear(nn.Linear(12, 10, dtype=torch.float64), r=4, alpha=8, frozen=frozen)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("b", [1, 2, 4])
def test_dylora_rank_b_is_truncated_lora(b):
    layer = dylora_layer()
    layer.active_rank = b
    x = torch.randn(5, 12, dtype=torch.float64)
    A, B = layer.lora_A[:b], layer.lora_B[:, :b]
    expected = layer.base_layer(x) + (8 / b) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)
    assert int(torch.linalg.matrix_rank(layer.delta_weight())) == b


def test_dylora_eval_rank():
    layer = dylora_layer()
    layer.eval_rank = 2
    layer.active_rank = 4
    layer.eval()
    assert layer.rank_in_use == 2
    layer.train()
    assert layer.rank_in_use == 4


@pytest.mark.parametrize("frozen", [False, True])
def test_dylora_gradients_reach_only_the_ranks_in_use(frozen):
    layer = dylora_layer(frozen)
    layer.active_rank = 3
    layer(torch.randn(5, 12, dtype=torch.float64)).sum().backward()
    assert torch.all(layer.lora_A.grad[3:] == 0) and torch.all(layer.lora_B.grad[:, 3:] == 0)
    assert layer.lora_A.grad[2].abs().sum() > 0
    lower = layer.lora_A.grad[:2].abs().sum()
    assert (lower == 0) if frozen else (lower > 0)


def test_dylora_rank_sampling_is_deterministic_per_step():
    method = DyLoRAMethod(melora.DyLoRAConfig(r=8, r_min=2), seed=3)
    draws = [method.sample_rank(s) for s in range(200)]
    assert draws == [DyLoRAMethod(melora.DyLoRAConfig(r=8, r_min=2), seed=3).sample_rank(s) for s in range(200)]
    assert set(draws) == set(range(2, 9))
    model = melora.inject(tiny_bert(), melora.DyLoRAConfig(r=8))
    method = melora.get_method(model.melora_config, seed=3)
    method.on_step_begin(model, 17)
    assert {l.active_rank for l in melora.adapter_layers(model).values()} == {method.sample_rank(17)}


def train_steps(model, method, steps, lr=1e-2, start=0):
    """Optimiser steps ``start .. start+steps-1`` with every method hook in place."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(start, start + steps):
        method.on_step_begin(model, step)
        ids = torch.randint(0, 120, (4, 8), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        method.before_optimizer_step(model, step)
        opt.step()
        method.on_step_end(model, step)
        opt.zero_grad()


def test_delta_lora_moves_w_exactly_as_specified():
    cfg = melora.DeltaLoRAConfig(r=4, alpha=8, delta_lambda=0.5, update_start_step=2)
    model = melora.inject(tiny_bert(), cfg)
    method = melora.get_method(cfg)
    layers = melora.adapter_layers(model)
    name = next(iter(layers))
    layer = layers[name]
    assert isinstance(layer.lora_dropout, nn.Identity)  # Delta-LoRA has no adapter dropout

    w0 = layer.base_layer.weight.detach().clone()
    train_steps(model, method, 2)  # steps 0, 1 < K: W untouched
    assert torch.equal(layer.base_layer.weight, w0)

    product_before = (layer.lora_B[0] @ layer.lora_A[0]).detach().clone()
    train_steps(model, method, 1, start=2)
    product_after = (layer.lora_B[0] @ layer.lora_A[0]).detach()
    expected = w0 + 0.5 * (8 / 4) * (product_after - product_before)
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(layer.base_layer.weight, w0)


def test_delta_lora_save_load_keeps_moved_w(tmp_path):
    cfg = melora.DeltaLoRAConfig(r=2, update_start_step=0)
    model = melora.inject(tiny_bert(), cfg)
    train_steps(model, melora.get_method(cfg), 3)
    model.eval()
    ids = torch.randint(0, 120, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    melora.save_adapter(model, tmp_path)
    loaded = melora.load_adapter(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_adalora_through_peft_reallocates_rank(tmp_path):
    cfg = melora.AdaLoRAConfig(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10, modules_to_save=["classifier"])
    model = melora.inject(tiny_bert(), cfg)
    summary = melora.describe(model)
    assert len(summary.layers) == 4 and all(l.r == 6 for l in summary.layers)
    method = melora.get_method(cfg)
    train_steps(model, method, 10, lr=1e-1)
    ranks = [int((layer.lora_E["default"] != 0).sum()) for _, layer in model.named_modules() if hasattr(layer, "lora_E")]
    assert sum(ranks) <= 2 * len(ranks) < 6 * len(ranks)  # budget cut from init_r to target_r on average

    model.eval()
    ids = torch.randint(0, 120, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    melora.save_adapter(model, tmp_path)
    loaded = melora.load_adapter(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_adalora_needs_total_step():
    with pytest.raises(ValueError, match="AdaLoRA needs total_step"):
        melora.inject(tiny_bert(), melora.AdaLoRAConfig())


def test_adalora_adapter_records_target_layers(tmp_path):
    cfg = melora.AdaLoRAConfig(init_r=4, target_r=2, total_step=10)
    melora.save_adapter(melora.inject(tiny_bert(), cfg), tmp_path)
    meta = melora.read_adapter_config(tmp_path)
    assert len(meta["target_layers"]) == 4 and meta["target_layers"][0]["d_in"] == 64
