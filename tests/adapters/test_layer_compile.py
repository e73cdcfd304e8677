"""MELoRALinear under torch.compile (fullgraph, CPU) and bf16 autocast, on every path."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import randomize_adapters, tiny_bert
from torch.utils._python_dispatch import TorchDispatchMode

import melora
from melora import MELoRALinear
from melora.adapters.melora import FORMULATIONS

# bf16 keeps 8 significant bits (relative spacing 2^-8): a product of bf16 operands is off by about
# one spacing, so a whole gradient tensor must be within 4 spacings of fp32, in relative Frobenius norm.
BF16_REL_TOL = 2**-6


def injected_bert(path: str, train: bool = False):
    model = melora.inject(tiny_bert(), melora.MELoRAConfig(n=4, r=2, target_modules=["query", "value"]))
    randomize_adapters(model)
    for layer in melora.adapter_layers(model).values():
        layer.formulation = path
    if train:  # dropout modules active (MELoRA's takes the fused path's own-input branch) but p = 0: deterministic
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return model


def eager_and_compiled(path: str, backend: str, train: bool = False, autocast: bool = False):
    """Logits and adapter gradients of one forward + backward, eager and compiled with fullgraph=True."""
    torch._dynamo.reset()
    model = injected_bert(path, train)
    twin = copy.deepcopy(model)
    batch = {"input_ids": torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0)), "labels": torch.tensor([0, 2])}
    results = []
    for m in (model, torch.compile(twin, fullgraph=True, backend=backend)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(**batch)
        out.loss.backward()
        grads = {name: p.grad for name, p in (m._orig_mod if m is not model else m).named_parameters() if p.requires_grad}
        results.append((out.logits.float(), grads))
    return results


@pytest.mark.parametrize("path", ("auto",) + FORMULATIONS)
def test_fullgraph_compile_aot_eager_matches_eager(path):
    (eager, eager_grads), (compiled, compiled_grads) = eager_and_compiled(path, "aot_eager")
    torch.testing.assert_close(compiled, eager)
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) == 8  # 2 layers × (query, value) × (A, B)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], msg=lambda m: f"{name}: {m}")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("path", ["fused", "fused_dense", "fused_blocks", "bmm"])
def test_fullgraph_compile_in_training_mode(path):
    (eager, eager_grads), (compiled, compiled_grads) = eager_and_compiled(path, "aot_eager", train=True)
    torch.testing.assert_close(compiled, eager)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name])


@pytest.mark.parametrize("path", FORMULATIONS)
def test_fullgraph_compile_under_bf16_autocast(path):
    """The traced graph rounds to bf16 in other places than eager: equal within bf16 tolerance."""
    (eager, eager_grads), (compiled, compiled_grads) = eager_and_compiled(path, "aot_eager", autocast=True)
    assert relative_error(compiled, eager) <= BF16_REL_TOL
    for name in eager_grads:
        assert relative_error(compiled_grads[name], eager_grads[name]) <= BF16_REL_TOL, name


# Inductor compiles C++ kernels: about 30 s cold, 7 s with a warm cache, on 2 loaded CPU cores;
# under the 60 s that would make it a slow test.
@pytest.mark.parametrize("path", ["auto", "fused"])
def test_fullgraph_compile_inductor_matches_eager(path):
    (eager, eager_grads), (compiled, compiled_grads) = eager_and_compiled(path, "inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5)


# ---- bf16 autocast -------------------------------------------------------------------------------


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the operands of every matrix product dispatched while active."""

    PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "addmm_", "baddbmm_"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            self.seen.append((name, {a.dtype for a in args if isinstance(a, torch.Tensor)}))
        return func(*args, **(kwargs or {}))


def bf16_layer(d_in, d_out, n, r, path):
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(d_in, d_out), n=n, r=r)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)
    layer.formulation = path
    return layer


@pytest.mark.parametrize("path", ("auto",) + FORMULATIONS)
def test_autocast_keeps_the_frozen_dtype_and_runs_the_adapter_in_bf16(path):
    layer = bf16_layer(64, 96, 8, 2, path)
    x = torch.randn(4, 16, 64, requires_grad=True)
    with MatmulDtypes() as products:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            base_out = layer.base_layer(x)
        out.float().sum().backward()
    assert out.dtype == base_out.dtype == torch.bfloat16
    assert len(products.seen) >= 6 and all(dtypes == {torch.bfloat16} for _, dtypes in products.seen), products.seen
    # The factors stay fp32 master weights, with fp32 gradients; the input's gradient has the input's dtype.
    assert layer.lora_A.dtype == layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("d_in,d_out,n,r", [(64, 96, 8, 2), (96, 64, 4, 1), (64, 64, 1, 8), (128, 64, 16, 8)])
@pytest.mark.parametrize("path", ("auto",) + FORMULATIONS)
def test_autocast_gradients_match_fp32_within_bf16_tolerance(path, d_in, d_out, n, r):
    layer = bf16_layer(d_in, d_out, n, r, path)
    x = torch.randn(4, 16, d_in, requires_grad=True)
    upstream = torch.randn(4, 16, d_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (out.float() * upstream).sum().backward()
    got = (out.float(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    out = layer(x)
    (out * upstream).sum().backward()
    want = (out, x.grad, layer.lora_A.grad, layer.lora_B.grad)
    for name, g, w in zip(("output", "grad x", "grad A", "grad B"), got, want):
        error = relative_error(g, w)
        assert error <= BF16_REL_TOL, f"{path} {name}: relative error {error:.4f} > {BF16_REL_TOL}"


@pytest.mark.parametrize("path", ("auto",) + FORMULATIONS)
def test_bf16_weights_without_autocast_stay_bf16(path):
    """A model loaded in bf16 (the LLaMA configs): factors, output and gradients bf16, close to fp32 math."""
    layer = bf16_layer(64, 96, 8, 2, path)
    reference = copy.deepcopy(layer)
    layer.to(torch.bfloat16)
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})  # the same bf16 values, in fp32
    x = torch.randn(4, 16, 64).bfloat16()
    upstream = torch.randn(4, 16, 96).bfloat16()
    got, want = [], []
    for module, dtype, results in ((layer, torch.bfloat16, got), (reference, torch.float32, want)):
        inp = x.to(dtype, copy=True).requires_grad_(True)
        out = module(inp)
        (out * upstream.to(dtype)).sum().backward()
        results += [out, inp.grad, module.lora_A.grad, module.lora_B.grad]
    assert {t.dtype for t in got} == {torch.bfloat16}
    for name, g, w in zip(("output", "grad x", "grad A", "grad B"), got, want):
        assert relative_error(g, w) <= BF16_REL_TOL, f"{path} {name}"
