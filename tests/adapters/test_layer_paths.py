"""Every formulation of MELoRALinear's product (``layer.formulation``) against a dense float64 reference, and the cost rule."""

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import melora.adapters.formulations as melora_layer
from melora import MELoRALinear
from melora.adapters.melora import FORMULATIONS, choose_formulation, group_count

SHAPES = [(24, 40, n, r) for n in (1, 2, 4, 8) for r in (1, 2, 8)] + [(64, 16, 2, 8), (64, 16, 8, 1)]  # (d_in, d_out, n, r)
LEADS = [(7,), (2, 3)]  # 2-D and 3-D inputs
TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-4}}


def random_layer(d_in, d_out, n, r, dtype, base=None, **kwargs):
    torch.manual_seed(0)
    layer = MELoRALinear(base or nn.Linear(d_in, d_out, dtype=dtype), n=n, r=r, alpha=16.0, **kwargs)
    with torch.no_grad():  # B = 0 at init would make every check trivial
        layer.lora_B.normal_()
    return layer


def reference(layer, x, mask=None, upstream=None):
    """Output and gradients (x, A, B) of W x + b + s·blockdiag(B_i)·blockdiag(A_i)·(mask ⊙ x), all in float64."""
    W = layer.base_layer.weight.detach().double()
    W = W.T if layer.fan_in_fan_out else W
    b = layer.base_layer.bias.detach().double()
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    x = x.detach().double().requires_grad_(True)
    xa = x if mask is None else x * mask.double()
    out = x @ W.T + b + layer.scaling * (xa @ torch.block_diag(*A).T @ torch.block_diag(*B).T)
    (out * upstream.double()).sum().backward()
    return out, x.grad, A.grad, B.grad


def run(layer, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    (out * upstream).sum().backward()
    return out, x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("lead", LEADS, ids=["2d", "3d"])
@pytest.mark.parametrize("d_in,d_out,n,r", SHAPES)
@pytest.mark.parametrize("path", FORMULATIONS)
def test_every_path_matches_dense_float64(path, d_in, d_out, n, r, lead, dtype):
    layer = random_layer(d_in, d_out, n, r, dtype)
    layer.formulation = path
    assert layer.formulation_for(torch.zeros(1, d_in, dtype=dtype)) == path  # forced, whatever the rule says
    x = torch.randn(*lead, d_in, dtype=dtype)
    upstream = torch.randn(*lead, d_out, dtype=dtype)
    got = run(layer, x, upstream)
    want = reference(layer, x, upstream=upstream)
    assert got[0].shape == (*lead, d_out) and got[0].dtype == dtype
    for name, g, w in zip(("output", "grad x", "grad A", "grad B"), got, want):
        torch.testing.assert_close(g.double(), w.detach(), **TOL[dtype], msg=lambda m: f"{path} {name}: {m}")
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


@pytest.mark.parametrize("path", FORMULATIONS)
def test_every_path_with_dropout_and_conv1d(path):
    """Dropout gives the adapter its own input (the fused backward's unshared branch); Conv1D stores W transposed."""
    torch.manual_seed(0)
    conv = Conv1D(40, 24).double()
    layer = random_layer(24, 40, 4, 2, torch.float64, base=conv, dropout=0.5)
    layer.formulation = path
    layer.train()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    upstream = torch.randn(2, 5, 40, dtype=torch.float64)
    torch.manual_seed(1)
    got = run(layer, x, upstream)
    torch.manual_seed(1)
    mask = layer.lora_dropout(torch.ones_like(x))  # the same draw: one dropout call per forward on every path
    want = reference(layer, x, mask, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", FORMULATIONS)
def test_every_path_without_grad_and_after_merge(path):
    layer = random_layer(24, 40, 8, 2, torch.float64)
    layer.formulation = path
    x = torch.randn(3, 24, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, reference(layer, x, upstream=torch.zeros(3, 40))[0].detach())
    layer.merge()
    torch.testing.assert_close(layer(x), out)


@pytest.fixture
def rule(monkeypatch):
    """The rule with its thresholds pinned, so calibrating the constants does not rewrite these cases."""
    monkeypatch.setattr(melora_layer, "CALIBRATED_DEVICES", ("cpu",))
    monkeypatch.setattr(melora_layer, "CPU_BLOCKS_MAX_N", 8)
    monkeypatch.setattr(melora_layer, "CPU_DENSE_MAX_RANK", 32)
    monkeypatch.setattr(melora_layer, "MACHINE_BALANCE", {"cuda": 64.0})
    monkeypatch.setattr(melora_layer, "DEFAULT_MACHINE_BALANCE", 8.0)
    monkeypatch.setattr(melora_layer, "DENSE_MIN_TOKENS_PER_RANK", 4)
    monkeypatch.setattr(melora_layer, "CPU_BF16_DTYPES", (torch.bfloat16,))
    monkeypatch.setattr(melora_layer, "GROUPS_MAX_RANK", 128)
    return choose_formulation


@pytest.mark.parametrize(
    "d,n,r,tokens,dtype,device,needs_grad,expected",
    [
        # CPU (calibrated), with gradients: a fused path; blocks at r = 1 and small n, dense up to n·r = 32
        (768, 1, 8, 512, torch.float32, "cpu", True, "fused"),
        (768, 1, 1, 4096, torch.float32, "cpu", True, "fused"),  # n = 1: one block, nothing to choose
        (768, 2, 1, 4096, torch.float32, "cpu", True, "fused_blocks"),
        (768, 8, 1, 512, torch.float32, "cpu", True, "fused_blocks"),
        (768, 16, 1, 4096, torch.float32, "cpu", True, "fused_dense"),  # r = 1 but n > 8
        (768, 4, 2, 512, torch.float32, "cpu", True, "fused_dense"),
        (768, 2, 8, 4096, torch.float32, "cpu", True, "fused_dense"),
        (768, 4, 8, 4096, torch.float32, "cpu", True, "fused_dense"),  # n·r = 32
        (768, 8, 8, 4096, torch.float32, "cpu", True, "fused"),  # n·r = 64 > 32
        (768, 64, 1, 4096, torch.float32, "cpu", True, "fused"),
        (768, 64, 8, 16, torch.float16, "cpu", True, "fused"),  # fp16 follows the fp32 rule
        # CPU without gradients: bmm, dense at n = 1
        (768, 1, 8, 512, torch.float32, "cpu", False, "dense"),  # n = 1 is plain LoRA
        (768, 4, 2, 512, torch.float32, "cpu", False, "bmm"),
        # CPU bf16: LoRA's dense pair up to n·r = 128, then groups of rank ≤ 128
        (768, 1, 8, 4096, torch.bfloat16, "cpu", True, "fused_dense"),
        (768, 8, 1, 512, torch.bfloat16, "cpu", True, "fused_dense"),  # fp32 would take "fused_blocks"
        (4096, 8, 8, 512, torch.bfloat16, "cpu", True, "fused_dense"),  # n·r = 64
        (4096, 64, 2, 512, torch.bfloat16, "cpu", True, "fused_dense"),  # n·r = 128
        (4096, 64, 4, 512, torch.bfloat16, "cpu", True, "fused_groups"),  # n·r = 256 > 128
        (768, 64, 8, 16, torch.bfloat16, "cpu", True, "fused_groups"),
        (4096, 64, 1, 4096, torch.bfloat16, "cpu", False, "dense"),
        (4096, 64, 8, 4096, torch.bfloat16, "cpu", False, "fused_groups"),
        # other devices: the roofline guess
        (4096, 1, 64, 1, torch.bfloat16, "cuda", False, "dense"),
        (4096, 64, 1, 4096, torch.bfloat16, "cuda", True, "dense"),  # 2·n·r = 128 ≤ 64·2
        (4096, 16, 8, 4096, torch.bfloat16, "cuda", True, "fused"),  # 256 > 128
        (4096, 16, 8, 4096, torch.bfloat16, "cuda", False, "bmm"),  # same, inference
        (4096, 32, 1, 4096, torch.float32, "cuda", True, "dense"),  # 64 ≤ 64·4
        (4096, 32, 2, 4096, torch.bfloat16, "cuda", True, "dense"),  # 128 ≤ 128
        (4096, 2, 2, 8, torch.bfloat16, "cuda", True, "fused"),  # T = 8 < 4·n·r: building blockdiag would dominate
        (4096, 4, 2, 4096, torch.float32, "meta", True, "dense"),  # DEFAULT_MACHINE_BALANCE: 16 ≤ 8·4
        (4096, 8, 4, 4096, torch.float32, "meta", True, "fused"),  # 64 > 32
    ],
)
def test_cost_rule_picks_the_documented_path(rule, d, n, r, tokens, dtype, device, needs_grad, expected):
    assert rule(d, d, n, r, tokens, dtype, device, needs_grad) == expected


def test_layer_asks_the_rule_with_its_call(rule):
    layer = MELoRALinear(nn.Linear(64, 64), n=8, r=8)
    x = torch.randn(256, 64)
    assert layer.formulation_for(x) == "fused"
    with torch.no_grad():
        assert layer.formulation_for(x) == "bmm"
        assert MELoRALinear(nn.Linear(64, 64), n=1, r=4).formulation_for(x) == "dense"
    x.requires_grad_(False)
    frozen = MELoRALinear(nn.Linear(64, 64), n=8, r=4).requires_grad_(False)
    assert frozen.formulation_for(x) == "bmm"  # nothing needs a gradient: an inference call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.formulation_for(x) == "fused_dense"  # the rule sees autocast's dtype: bf16, n·r = 64


def test_fused_needs_a_plain_frozen_base(rule):
    layer = MELoRALinear(nn.Linear(64, 64), n=8, r=8)
    x = torch.randn(256, 64)
    layer.base_layer.register_forward_hook(lambda module, args, out: None)
    assert layer.formulation_for(x) == "bmm"  # the rule's "fused" would skip the hook
    for n, r, unfused in ((4, 2, "dense"), (4, 1, "bmm")):  # the rule's "fused_dense", "fused_blocks"
        hooked = MELoRALinear(nn.Linear(64, 64), n=n, r=r)
        hooked.base_layer.register_forward_hook(lambda module, args, out: None)
        assert hooked.formulation_for(x) == unfused
    lora = MELoRALinear(nn.Linear(64, 64), n=1, r=4)
    lora.base_layer.register_forward_hook(lambda module, args, out: None)
    assert lora.formulation_for(x) == "dense"  # n = 1 falls back to plain LoRA
    layer.formulation = "fused"
    with pytest.raises(ValueError, match="path='fused' needs a frozen nn.Linear or Conv1D without hooks"):
        layer(x)
    layer.formulation = "loop"
    with pytest.raises(
        ValueError,
        match=r"formulation='loop' is unknown; set layer.formulation to 'auto' or one of \('bmm', 'dense', 'fused', 'fused_dense', 'fused_blocks', 'fused_groups'\)",
    ):
        layer(x)


@pytest.mark.parametrize(
    "n,r,max_rank,expected",
    [(1, 8, 64, 1), (8, 8, 64, 1), (64, 8, 64, 8), (64, 2, 64, 2), (16, 8, 64, 2), (8, 3, 5, 8), (12, 2, 8, 3), (4, 128, 64, 4)],
)
def test_group_count_is_the_fewest_groups_within_the_rank(n, r, max_rank, expected):
    assert group_count(n, r, max_rank) == expected
    assert n % expected == 0 and ((n // expected) * r <= max_rank or expected == n)


@pytest.mark.parametrize("max_rank", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n,r", [(8, 2), (4, 1), (8, 1), (4, 3)])
def test_fused_groups_matches_dense_float64_at_every_group_count(monkeypatch, n, r, max_rank):
    """``GROUPS_MAX_RANK`` sets the groups; every count from 1 (dense) to n (blocks) is exact."""
    monkeypatch.setattr(melora_layer, "GROUPS_MAX_RANK", max_rank)
    layer = random_layer(48, 96, n, r, torch.float64)
    layer.formulation = "fused_groups"
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    upstream = torch.randn(2, 5, 96, dtype=torch.float64)
    for got, want in zip(run(layer, x, upstream), reference(layer, x, upstream=upstream)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
