"""MELoRALinear against an independent dense float64 reference."""

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from melora import MELoRALinear

SHAPES = [  # (d_in, d_out, n, r)
    (16, 16, 1, 4),
    (16, 16, 4, 1),
    (24, 40, 8, 2),
    (40, 24, 4, 3),
    (64, 32, 16, 1),
]


def random_layer(d_in, d_out, n, r, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(d_in, d_out, dtype=dtype), n=n, r=r, alpha=16.0, **kwargs)
    with torch.no_grad():  # B = 0 at init would make every check trivial
        layer.lora_B.normal_()
    return layer


def dense_reference(layer: MELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """W x + b + s·blockdiag(B_i)·blockdiag(A_i)·x, built from the blocks independently."""
    A = torch.block_diag(*[a.double() for a in layer.lora_A])  # (n r, d_in)
    B = torch.block_diag(*[b.double() for b in layer.lora_B])  # (d_out, n r)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    x = x.double()
    return x @ W.T + b + layer.scaling * (x @ A.T @ B.T)


@pytest.mark.parametrize("d_in,d_out,n,r", SHAPES)
def test_forward_matches_dense_float64(d_in, d_out, n, r):
    layer = random_layer(d_in, d_out, n, r)
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lead", [(7,), (2, 3), (2, 1, 4)])
def test_any_leading_shape(lead):
    layer = random_layer(24, 40, 8, 2)
    x = torch.randn(*lead, 24, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (*lead, 40)
    torch.testing.assert_close(out, dense_reference(layer, x))


@pytest.mark.parametrize("d_in,d_out,n,r", SHAPES)
def test_gradients_match_dense_reference(d_in, d_out, n, r):
    layer = random_layer(d_in, d_out, n, r)
    x = torch.randn(4, d_in, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, d_out, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()

    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    dW = torch.block_diag(*B) @ torch.block_diag(*A) * layer.scaling
    ref = x_ref @ (layer.base_layer.weight + dW).T + layer.base_layer.bias
    (ref * upstream).sum().backward()

    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("d_in,d_out,n,r", SHAPES)
def test_delta_weight_rank_and_param_count(d_in, d_out, n, r):
    layer = random_layer(d_in, d_out, n, r)
    delta = layer.delta_weight()
    assert delta.shape == (d_out, d_in)
    assert int(torch.linalg.matrix_rank(delta)) == n * r == layer.equivalent_rank
    # n blocks of (r·d_in/n + d_out/n·r) = (d_in + d_out)·r
    assert layer.lora_A.numel() + layer.lora_B.numel() == (d_in + d_out) * r
    assert layer.lora_A.shape == (n, r, d_in // n) and layer.lora_B.shape == (n, d_out // n, r)


def test_delta_weight_is_block_diagonal_of_block_products():
    layer = random_layer(24, 40, 4, 2)
    delta = layer.delta_weight()
    for i in range(4):
        for j in range(4):
            block = delta[i * 10 : (i + 1) * 10, j * 6 : (j + 1) * 6]
            expected = layer.lora_B[i] @ layer.lora_A[i] * layer.scaling if i == j else torch.zeros(10, 6, dtype=delta.dtype)
            torch.testing.assert_close(block, expected)


def test_init_is_zero_update_and_kaiming_per_block():
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(512, 256), n=8, r=4)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.delta_weight()) == 0
    x = torch.randn(3, 512)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    # Kaiming-uniform with a=sqrt(5) on a (r, d_in/n) block: bound 1/sqrt(d_in/n)
    bound = 1 / (512 / 8) ** 0.5
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound


def test_gaussian_init():
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(256, 256), n=4, r=2, init="gaussian")
    assert abs(layer.lora_A.std().item() - 0.5) < 0.05


@pytest.mark.parametrize("rule,expected", [("per_mini", 16 / 2), ("equivalent", 16 / 8), ("rslora", 16 / 2**0.5)])
def test_scaling_rules(rule, expected):
    layer = MELoRALinear(nn.Linear(16, 16), n=4, r=2, alpha=16, scaling=rule)
    assert layer.scaling == pytest.approx(expected)


def test_merge_unmerge_idempotent_and_exact():
    layer = random_layer(24, 40, 4, 2)
    x = torch.randn(5, 24, dtype=torch.float64)
    before_w = layer.base_layer.weight.detach().clone()
    expected = layer(x)
    layer.merge()
    merged_once = layer.base_layer.weight.detach().clone()
    layer.merge()  # a second merge is a no-op
    assert torch.equal(layer.base_layer.weight, merged_once)
    assert layer.merged
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.base_layer(x), expected)  # merged: the base layer alone
    torch.testing.assert_close(merged_once, before_w + layer.delta_weight())
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, before_w)
    torch.testing.assert_close(layer(x), expected)


def test_safe_merge_refuses_nan():
    layer = random_layer(16, 16, 4, 1)
    w = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, w)


def test_not_divisible_error_names_layer_and_fix():
    with pytest.raises(ValueError, match=r"d_in=770 of layer 'encoder.layer.0.attention.self.query' is not divisible by n=8"):
        MELoRALinear(nn.Linear(770, 768), n=8, r=1, name="encoder.layer.0.attention.self.query")
    with pytest.raises(ValueError, match=r"d_out=30 is not divisible by n=4"):
        MELoRALinear(nn.Linear(32, 30), n=4, r=1)


def test_conv1d_matches_linear():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, dtype=torch.float64)
    conv = Conv1D(16, 24).double()
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    a = MELoRALinear(linear, n=4, r=2)
    b = MELoRALinear(conv, n=4, r=2)
    with torch.no_grad():
        a.lora_B.normal_()
        b.lora_A.copy_(a.lora_A)
        b.lora_B.copy_(a.lora_B)
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    torch.testing.assert_close(b(x), a(x))
    torch.testing.assert_close(b(x), dense_reference(a, x))
    b.merge()
    torch.testing.assert_close(conv.weight, (linear.weight + a.delta_weight()).T)
    torch.testing.assert_close(b(x), a(x))


def test_dropout_only_on_adapter_path():
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(16, 16), n=2, r=2, dropout=0.5)
    layer.eval()
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    with torch.no_grad():
        layer.lora_B.zero_()
    # With B = 0 the dropout cannot reach the output: the frozen path is untouched.
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_bf16_autocast_forward_backward():
    layer = random_layer(32, 32, 4, 2, dtype=torch.float32)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert layer.lora_A.grad is not None and torch.isfinite(layer.lora_A.grad).all()
    torch.testing.assert_close(out.float(), dense_reference(layer, x).float(), rtol=5e-2, atol=5e-2)
