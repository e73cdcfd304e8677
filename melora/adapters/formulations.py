"""The exact fast formulations of the MELoRA product, and the cost rule that picks one per call.

``melora.adapters.melora`` holds the method and its reference math; this module
computes the same thing faster. :func:`forward` is the one call a layer makes::

    h = W x + s · blockdiag(B_1..B_n) · blockdiag(A_1..A_n) · dropout(x)

The mini LoRAs are stored packed, ``lora_A: (n, r, d_in/n)`` and
``lora_B: (n, d_out/n, r)``. The adapter product has exact formulations
(``FORMULATIONS``) that differ only in speed, picked per call by :func:`choose_formulation`:

- ``"bmm"``: two batched products over a strided ``(n, T, ·)`` view of the
  input, the second one added in place into the frozen output:
  ``r·(d_in + d_out)`` multiply-adds per token;
- ``"dense"``: one GEMM pair with ``blockdiag(A) (n·r, d_in)`` and
  ``blockdiag(B) (d_out, n·r)`` built on the fly, LoRA's cost at rank
  ``n·r`` (``n`` times the multiply-adds, in two large GEMMs instead of ``2n``
  small ones); for ``n = 1`` it is plain LoRA and builds nothing;
- ``"fused"``: the ``"bmm"`` products and the frozen layer in one
  ``torch.autograd.Function`` whose backward writes the input's gradient into
  a strided view of the frozen layer's (no transposed-view copy, no extra sum)
  and the factors' gradients from the same views;
- ``"fused_groups"``: the same Function with the mini LoRAs in ``g`` groups of
  ``n/g`` consecutive ones, one dense GEMM pair per group on column slices
  (rank ``n·r/g`` each, ``n/g`` times the multiply-adds of ``"bmm"``): ``g``
  is the fewest groups whose rank is at most ``GROUPS_MAX_RANK``;
  ``"fused_dense"`` is its ``g = 1`` and ``"fused_blocks"`` its ``g = n``
  (a loop over the mini LoRAs).

A contiguous-block layout (a ``(n, T, d_in/n)`` copy of the input) is not
one of them: it adds a pass over the input to what ``"bmm"`` reads in place.
The dense ``ΔW`` is built only for merging and analysis.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from melora.adapters.base import Conv1D

FORMULATIONS = ("bmm", "dense", "fused", "fused_dense", "fused_blocks", "fused_groups")
# The paths that run the frozen layer and the adapter in one _FusedMELoRA.
FUSED_PATHS = ("fused", "fused_dense", "fused_blocks", "fused_groups")

# The cost rule of choose_formulation.
#
# CPU, fp32 (and fp16, unmeasured): calibrated by `scripts/bench_layer.py --paths` (results/bench/layer.md
# at 2 threads and layer-1thread.md at 1 thread: 2-core AMD EPYC, fp32, d = 768 and 4096, n in {1..64},
# r in {1, 2, 8}, 512 and 4096 tokens). With gradients the fused paths beat their unfused
# forms in almost every config (they add the adapter's input gradient into the frozen layer's in
# place instead of summing two tensors), and among them: at r = 1 and small n, "fused_blocks"
# (n GEMV-shaped products on column slices: 0.94-0.98 x the faster of PEFT LoRA rank n and the
# per-mini loop, medians, 1 thread, T = 4096) beat "fused" (bmm with inner dimension 1:
# 1.02-1.07 x there); for n·r up to 32 "fused_dense" (LoRA's two GEMMs at rank n·r, whose
# efficiency on this CPU does not grow monotonically with the rank) was the fastest or within
# noise of it, and "fused" missed PEFT LoRA rank n·r by up to 6 % (n = 2, r = 8, T = 4096); past
# n·r = 32 the dense GEMMs do n times the multiply-adds (1.6-1.8 x at n·r = 512) and "fused" won
# (0.47-0.96 x at n·r = 64, 128, 512, 1 and 2 threads). Without gradients "bmm" matched "dense" at small n·r and beat it as n·r grew.
CPU_BLOCKS_MAX_N = 8  # r = 1, 2 ≤ n ≤ this, with gradients: "fused_blocks"
CPU_DENSE_MAX_RANK = 32  # n ≥ 2, n·r ≤ this, with gradients: "fused_dense"
# CPU, bf16 (the factors' dtype, or autocast's): calibrated by `bench_layer.py --paths --dtype bf16`
# (results/bench/layer-bf16-paths.md, layer-1thread-bf16-paths.md: 2-core Intel Xeon with AMX-bf16, d = 768
# and 4096, 1 and 2 threads).
# There the bf16 GEMMs run on AMX tiles and stay memory-bound up to rank ~64-128, so LoRA's dense
# pair at rank n·r costs about what rank r costs, while the batched products (bmm with inner
# dimensions r and d/n) do not use the tiles: "fused" ran 1.1-1.9 x PEFT LoRA rank n·r and "fused_blocks"
# up to 1.5 x at n = 8, r = 1, but "fused_dense" 0.73-0.98 x in every fwd+bwd config at d = 768 (2
# threads). Past n·r = 128 the dense pair's extra multiply-adds show (d = 4096, n = 64, r = 8: 1.16-1.25 x
# PEFT LoRA rank r), and groups of rank 64-128 were fastest there (0.98-1.02 x); at 512 tokens and
# d = 768 groups of rank 64 lose to rank 128 (n = 64, r = 2: 1.07 x PEFT LoRA rank 128 against 0.94-0.96 x;
# n = 64, r = 8: 1.17 x against 0.87 x, 2 threads; layer-bf16-paths.md and a side-by-side rerun),
# so "fused_groups" with GROUPS_MAX_RANK = 128 (its g = 1, "fused_dense", up to n·r = 128).
CPU_BF16_DTYPES = (torch.bfloat16,)
GROUPS_MAX_RANK = 128  # the largest rank of one group's dense GEMM pair in "fused_groups" (group_count)
CALIBRATED_DEVICES = ("cpu",)
# Other devices (cuda, mps, …): a roofline guess, UNCALIBRATED until `make bench-gpu` runs on one.
# FLOP per byte of memory traffic below which a GEMM is memory-bound. The dense pair does
# 2·n·r FLOP per element of x it reads and of the output it updates, 2·n·r / itemsize FLOP per
# byte: while that is ≤ the balance it costs no more time than the strided pair, which moves
# the same bytes.
MACHINE_BALANCE = {"cuda": 64.0}  # UNCALIBRATED
DEFAULT_MACHINE_BALANCE = 8.0  # UNCALIBRATED
# Building blockdiag(A) and blockdiag(B) writes n·r·(d_in + d_out) elements per call, against
# T·(d_in + d_out) for x and the output: the dense pair needs T ≥ this × n·r.
DENSE_MIN_TOKENS_PER_RANK = 4  # UNCALIBRATED


def choose_formulation(
    d_in: int, d_out: int, n: int, r: int, tokens: int, dtype: torch.dtype, device: torch.device | str, needs_grad: bool = True
) -> str:
    """The formulation of the MELoRA product for one call: one of ``FORMULATIONS``.

    The rule (deterministic; the constants above say where each part comes from):

    - CPU (calibrated), fp32, with gradients: ``"fused"`` for ``n = 1``;
      ``"fused_blocks"`` for ``r = 1`` and ``n ≤ CPU_BLOCKS_MAX_N``;
      ``"fused_dense"`` for ``n·r ≤ CPU_DENSE_MAX_RANK``; ``"fused"`` otherwise.
      Without gradients: ``"dense"`` for ``n = 1`` (plain LoRA), ``"bmm"`` for
      ``n ≥ 2``.
    - CPU (calibrated), bf16 (``CPU_BF16_DTYPES``), with or without gradients:
      ``"dense"`` without gradients and ``"fused_dense"`` with them for
      ``n·r ≤ GROUPS_MAX_RANK``, ``"fused_groups"`` otherwise.
    - Other devices (uncalibrated roofline guess): ``n = 1``: ``"dense"``;
      ``"dense"`` when ``2·n·r ≤ MACHINE_BALANCE[device.type] · dtype.itemsize``
      and ``tokens ≥ DENSE_MIN_TOKENS_PER_RANK · n·r`` (memory-bound like
      ``"bmm"``, in two large GEMMs); otherwise ``"fused"`` with gradients,
      ``"bmm"`` without.

    ``d_in`` and ``d_out`` cancel out of both cost ratios; they are arguments
    so that a calibrated rule may use them. A layer falls back from
    a fused path to its unfused form (``"bmm"``; ``"dense"`` for
    ``"fused_dense"`` and at ``n = 1``) when its frozen layer
    is not a plain frozen ``nn.Linear`` / ``Conv1D`` without hooks
    (:meth:`MELoRALinear.formulation_for`).
    """
    device_type = torch.device(device).type
    if device_type in CALIBRATED_DEVICES and dtype in CPU_BF16_DTYPES:
        if n * r > GROUPS_MAX_RANK:
            return "fused_groups"
        return "fused_dense" if needs_grad else "dense"
    if device_type in CALIBRATED_DEVICES:
        if not needs_grad:
            return "dense" if n == 1 else "bmm"
        if n == 1:
            return "fused"
        if r == 1 and n <= CPU_BLOCKS_MAX_N:
            return "fused_blocks"
        return "fused_dense" if n * r <= CPU_DENSE_MAX_RANK else "fused"
    if n == 1:
        return "dense"
    balance = MACHINE_BALANCE.get(device_type, DEFAULT_MACHINE_BALANCE)
    if 2 * n * r <= balance * dtype.itemsize and tokens >= DENSE_MIN_TOKENS_PER_RANK * n * r:
        return "dense"
    return "fused" if needs_grad else "bmm"


def _add_block_products(out: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``out_i ← beta · out_i + batch1_i @ batch2_i`` for each column block ``i`` of ``out``.

    ``out`` ``(T, n·c)``, ``batch1`` ``(n, T, b)``, ``batch2`` ``(n, b, c)``. In eager mode in place,
    through a strided ``(n, T, c)`` view of ``out`` (``beta = 0``: ``out`` is not read). Under
    ``torch.compile`` out of place: functionalization cannot replay an in-place op on a transposed
    view, and inductor fuses the add anyway.
    """
    n, c = batch2.shape[0], batch2.shape[2]
    if torch.compiler.is_compiling():
        product = torch.bmm(batch1, batch2).transpose(0, 1).reshape(out.shape)
        return product if beta == 0 else out + product
    out.view(-1, n, c).transpose(0, 1).baddbmm_(batch1, batch2, beta=beta)
    return out


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """``blockdiag(blocks_1..blocks_n)`` ``(n·p, n·q)`` from packed ``blocks`` ``(n, p, q)``, in one op."""
    n, p, q = blocks.shape
    if n == 1:
        return blocks[0]
    # diag_embed puts block i at [i, :, i, :] of an (n, p, n, q) tensor (torch.block_diag takes n tensors).
    return torch.diag_embed(blocks.permute(1, 2, 0), dim1=0, dim2=2).reshape(n * p, n * q)


def _diagonal_blocks(dense: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` diagonal blocks ``(n, p, q)`` of ``dense`` ``(n·p, n·q)``: the inverse of :func:`block_diagonal`."""
    p, q = dense.shape[0] // n, dense.shape[1] // n
    return dense.view(n, p, n, q).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _addmm_column_blocks(out: torch.Tensor, mats1: list[torch.Tensor], mats2: list[torch.Tensor]) -> torch.Tensor:
    """``out[:, block i] ← out[:, block i] + mats1[i] @ mats2[i]`` over ``len(mats1)`` equal column blocks.

    In eager mode in place on column slices (no copies); under ``torch.compile`` out of place, as
    :func:`_add_block_products`.
    """
    if torch.compiler.is_compiling():
        return out + torch.cat([a @ b for a, b in zip(mats1, mats2)], dim=1)
    width = out.shape[1] // len(mats1)
    for i, (a, b) in enumerate(zip(mats1, mats2)):
        out[:, i * width : (i + 1) * width].addmm_(a, b)
    return out


def group_count(n: int, r: int, max_rank: int | None = None) -> int:
    """Groups of path ``"fused_groups"``: the fewest ``g`` dividing ``n`` with ``(n/g)·r ≤ max_rank``.

    ``max_rank`` defaults to ``GROUPS_MAX_RANK``; ``g = n`` when even one mini LoRA's ``r`` exceeds it.
    """
    max_rank = GROUPS_MAX_RANK if max_rank is None else max_rank
    return next(g for g in range(1, n + 1) if n % g == 0 and (n // g) * r <= max_rank or g == n)


def _column_blocks(mat: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """``groups`` equal column slices of ``mat`` ``(T, c)``: views ``(T, c/groups)``."""
    width = mat.shape[1] // groups
    return [mat[:, j * width : (j + 1) * width] for j in range(groups)]


def _group_factors(blocks: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """``blockdiag`` of each of ``groups`` runs of consecutive packed blocks ``(n, p, q)``: ``groups × (n·p/groups, n·q/groups)``."""
    size = blocks.shape[0] // groups
    return [block_diagonal(blocks[j * size : (j + 1) * size]) for j in range(groups)]


class _FusedMELoRA(torch.autograd.Function):
    """``h = base(x) + s · concat_i(B_i A_i x'_i)`` in one Function, with a copy-free backward.

    ``x'`` is ``adapter_x`` (``x`` after dropout), or ``x`` itself when
    ``adapter_x`` is ``None``: then the adapter's input gradient is added into
    the frozen layer's ``g·W`` in place, as the forward adds into the frozen
    output. ``groups`` is how the two adapter products are computed, forward
    and backward (all exact; which is fastest depends on the shape):

    - ``0``: batched products over strided ``(n, T, ·)`` views (path ``"fused"``);
    - ``g ≥ 1``: the mini LoRAs in ``g`` groups of ``n/g``, one GEMM per group and
      product on column slices with the group's ``blockdiag(A)`` ``(n·r/g, d_in/g)``
      and ``blockdiag(B)`` ``(d_out/g, n·r/g)``: LoRA's GEMMs at rank ``n·r/g``
      ``g`` times, no copies of the input; the factors' gradients are the
      diagonal blocks of each group's dense ones. ``g = 1`` is ``"fused_dense"``,
      ``g = n`` ``"fused_blocks"``.

    Shapes: ``x`` ``(..., d_in)``; ``weight`` ``(d_out, d_in)`` (``(d_in, d_out)``
    if ``fan_in_fan_out``); ``lora_A`` ``(n, r, d_in/n)``; ``lora_B``
    ``(n, d_out/n, r)``; output ``(T, d_out)``. The frozen weight and bias get
    no gradient.
    """

    @staticmethod
    def forward(ctx, x, adapter_x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, adapter_dtype, groups):
        n, d_in = lora_A.shape[0], x.shape[-1]
        k = d_in // n
        x2 = x.reshape(-1, d_in)
        if torch.is_autocast_enabled(x.device.type):
            # The casts autocast would make for the frozen layer's op, made once: the backward reuses
            # the weight's and, without dropout, the adapter shares the input's.
            dtype = torch.get_autocast_dtype(x.device.type)
            x2, weight, bias = x2.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        # The frozen layer's own op (nn.Linear's, Conv1D's).
        if fan_in_fan_out:
            result = torch.addmm(bias, x2, weight) if bias is not None else torch.mm(x2, weight)
        else:
            result = F.linear(x2, weight, bias)
        xa = (x2 if adapter_x is None else adapter_x.reshape(-1, d_in)).to(adapter_dtype)
        A = lora_A.to(adapter_dtype)
        B = lora_B.to(result.dtype)
        factors = ()
        if groups:
            A_groups, B_groups = _group_factors(A, groups), _group_factors(B, groups)
            hiddens = tuple(
                ((xa_j @ A_j.T) * scaling).to(result.dtype) for xa_j, A_j in zip(_column_blocks(xa, groups), A_groups)
            )  # groups × (T, n·r/groups)
            result = _addmm_column_blocks(result, hiddens, [B_j.T for B_j in B_groups])
            # Kept for the backward rather than rebuilt: n·r·(d_in + d_out)/groups elements.
            factors = (*A_groups, *B_groups)
        else:
            hidden = torch.bmm(xa.reshape(-1, n, k).transpose(0, 1), A.transpose(1, 2)) * scaling  # (n, T, r)
            hidden = hidden.to(result.dtype)
            result = _add_block_products(result, hidden, B.transpose(1, 2))
            hiddens = (hidden,)
        ctx.save_for_backward(xa, weight, A, B, *hiddens, *factors)
        ctx.scaling, ctx.fan_in_fan_out, ctx.shared, ctx.x_shape, ctx.groups = scaling, fan_in_fan_out, adapter_x is None, x.shape, groups
        ctx.dtypes = (x.dtype, lora_A.dtype, lora_B.dtype, None if adapter_x is None else adapter_x.dtype)
        return result

    @staticmethod
    def backward(ctx, grad):
        xa, weight, A, B, *saved = ctx.saved_tensors
        hiddens, factors = saved[: ctx.groups or 1], saved[ctx.groups or 1 :]
        x_dtype, A_dtype, B_dtype, adapter_x_dtype = ctx.dtypes
        n, r, k = A.shape
        m = B.shape[1]
        need = ctx.needs_input_grad
        g = grad.reshape(-1, n * m).to(B.dtype).contiguous()
        if ctx.groups:
            grad_A, grad_B, add_input_grad = _groups_backward(g, xa, A, factors, hiddens, ctx.scaling, need[4], need[5])
        else:
            grad_A, grad_B, add_input_grad = _bmm_backward(g, xa, A, B, hiddens, ctx.scaling, need[4], need[5])
        grad_A = None if grad_A is None else grad_A.to(A_dtype)
        grad_B = None if grad_B is None else grad_B.to(B_dtype)
        grad_x = grad_adapter_x = None
        if need[0]:
            grad_x = g @ weight.T if ctx.fan_in_fan_out else g @ weight  # (T, d_in), in the output's dtype
            if ctx.shared:
                grad_x = add_input_grad(grad_x)
            grad_x = grad_x.to(x_dtype).view(ctx.x_shape)
        if not ctx.shared and need[1]:
            grad_adapter_x = add_input_grad(torch.zeros(xa.shape, dtype=A.dtype, device=xa.device))
            grad_adapter_x = grad_adapter_x.to(adapter_x_dtype).view(ctx.x_shape)
        return grad_x, grad_adapter_x, None, None, grad_A, grad_B, None, None, None, None


def _bmm_backward(g, xa, A, B, hiddens, scaling, need_A, need_B):
    """The factors' gradients and the adapter's input gradient of form ``"bmm"``, from strided views."""
    (hidden,) = hiddens  # (n, T, r)
    n, r, k = A.shape
    g_blocks = g.view(-1, n, B.shape[1]).transpose(0, 1)  # (n, T, d_out/n), strided view
    grad_hidden = (torch.bmm(g_blocks, B) * scaling).to(A.dtype)  # (n, T, r)
    xa_blocks = xa.reshape(-1, n, k).transpose(0, 1)
    grad_A = torch.bmm(grad_hidden.transpose(1, 2), xa_blocks) if need_A else None
    grad_B = torch.bmm(g_blocks.transpose(1, 2), hidden) if need_B else None

    def add_input_grad(out):
        return _add_block_products(out, grad_hidden.to(out.dtype), A.to(out.dtype))

    return grad_A, grad_B, add_input_grad


def _groups_backward(g, xa, A, factors, hiddens, scaling, need_A, need_B):
    """Form ``groups``: LoRA's backward at rank ``n·r/groups`` on each group's column blocks.

    ``factors`` are the forward's ``blockdiag`` of each group's A, then of each group's B. The
    factors' gradients are the diagonal blocks of each group's dense ones.
    """
    groups = len(hiddens)
    minis = A.shape[0] // groups
    A_groups, B_groups = factors[:groups], factors[groups:]  # groups × (n·r/groups, d_in/groups), (d_out/groups, n·r/groups)
    g_blocks = _column_blocks(g, groups)  # groups × (T, d_out/groups), views
    grad_hidden = [((g_j @ B_j) * scaling).to(A.dtype) for g_j, B_j in zip(g_blocks, B_groups)]  # groups × (T, n·r/groups)
    grad_A = (
        torch.cat([_diagonal_blocks(gh.T @ xa_j, minis) for gh, xa_j in zip(grad_hidden, _column_blocks(xa, groups))]) if need_A else None
    )
    grad_B = torch.cat([_diagonal_blocks(g_j.T @ h, minis) for g_j, h in zip(g_blocks, hiddens)]) if need_B else None

    def add_input_grad(out):
        return _addmm_column_blocks(out, [gh.to(out.dtype) for gh in grad_hidden], [A_j.to(out.dtype) for A_j in A_groups])

    return grad_A, grad_B, add_input_grad


# ---- the calls a layer makes ----------------------------------------------------


def adapter_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    """Dtype of the first adapter product: the autocast dtype under autocast, else the factors'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return lora_A.dtype


def is_fusable(base_layer: nn.Module) -> bool:
    """Whether a fused path may compute ``base_layer`` itself: a plain frozen ``nn.Linear``/``Conv1D`` without hooks."""
    if type(base_layer) is not nn.Linear and not (Conv1D and type(base_layer) is Conv1D):
        return False
    if base_layer.weight.requires_grad or (base_layer.bias is not None and base_layer.bias.requires_grad):
        return False
    return not (base_layer._forward_hooks or base_layer._forward_pre_hooks)


def resolve_formulation(requested: str, x: torch.Tensor, base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor) -> str:
    """The formulation of one call: ``requested`` (one of ``FORMULATIONS``), or :func:`choose_formulation`'s for ``"auto"``.

    With ``"auto"`` a fused path falls back to its unfused form (``"bmm"``; ``"dense"``
    for ``"fused_dense"`` and at ``n = 1``) when ``base_layer`` is not fusable.

    Raises:
        ValueError: ``requested`` is unknown, or a fused path is forced on a layer that is not fusable.
    """
    n, r, d_in, d_out = lora_A.shape[0], lora_A.shape[1], lora_A.shape[0] * lora_A.shape[2], lora_B.shape[0] * lora_B.shape[1]
    if requested == "auto":
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)
        path = choose_formulation(d_in, d_out, n, r, x.numel() // d_in, adapter_dtype(x, lora_A), x.device, needs_grad)
        if path in FUSED_PATHS and not is_fusable(base_layer):
            return "dense" if n == 1 or path == "fused_dense" else "bmm"
        return path
    if requested not in FORMULATIONS:
        raise ValueError(f"formulation={requested!r} is unknown; set layer.formulation to 'auto' or one of {FORMULATIONS}")
    if requested in FUSED_PATHS and not is_fusable(base_layer):
        raise ValueError(
            f"path={requested!r} needs a frozen nn.Linear or Conv1D without hooks as base_layer, got "
            f"{type(base_layer).__name__}; set layer.formulation to 'bmm' or 'dense'"
        )
    return requested


def add_adapter_output(result: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                       path: str) -> torch.Tensor:
    """``result += s · concat_i(B_i A_i x_i)``, in place, without a Python loop.

    Args:
        result: Frozen output, ``(..., d_out)``.
        x: Adapter input (after dropout), ``(..., d_in)``.
        lora_A: ``(n, r, d_in/n)``; lora_B: ``(n, d_out/n, r)``.
        path: ``"dense"``: one GEMM pair on the block diagonals; any other: the ``"bmm"`` products.
    """
    n, r, k = lora_A.shape
    m = lora_B.shape[1]
    d_in, d_out = n * k, n * m
    if not result.is_contiguous():
        result = result.contiguous()
    x = x.to(adapter_dtype(x, lora_A))
    if path == "dense":
        A, B = block_diagonal(lora_A), block_diagonal(lora_B)
        hidden = x.reshape(-1, d_in) @ A.T  # (T, n·r)
        # Scale the small (T, n·r) intermediate rather than the (T, d_out) output.
        hidden = hidden * scaling
        result.view(-1, d_out).addmm_(hidden.to(result.dtype), B.T.to(result.dtype))
        return result
    x_blocks = x.reshape(-1, n, k).transpose(0, 1)  # (n, T, d_in/n), strided view
    hidden = torch.bmm(x_blocks, lora_A.transpose(1, 2))  # (n, T, r)
    hidden = hidden * scaling
    out = _add_block_products(result.view(-1, n * m), hidden.to(result.dtype), lora_B.transpose(1, 2).to(result.dtype))
    return out.view(result.shape)


def fused_forward(x: torch.Tensor, base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  dropout: nn.Module, path: str) -> torch.Tensor:
    """``base_layer(x) + s · concat_i(B_i A_i dropout(x)_i)`` in one :class:`_FusedMELoRA` (a fused ``path``)."""
    n, r = lora_A.shape[0], lora_A.shape[1]
    d_out = n * lora_B.shape[1]
    groups = {"fused": 0, "fused_dense": 1, "fused_blocks": n, "fused_groups": group_count(n, r)}[path]
    # Without dropout the adapter's input gradient is added into the frozen layer's in place.
    shared = isinstance(dropout, nn.Identity) or not dropout.training
    fan_in_fan_out = not isinstance(base_layer, nn.Linear)
    out = _FusedMELoRA.apply(
        x, None if shared else dropout(x), base_layer.weight, base_layer.bias, lora_A, lora_B,
        scaling, fan_in_fan_out, adapter_dtype(x, lora_A), groups,
    )  # fmt: skip
    return out.view(*x.shape[:-1], d_out)


def forward(x: torch.Tensor, base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
            dropout: nn.Module, path: str = "auto") -> torch.Tensor:
    """``base_layer(x) + s · blockdiag(B) · blockdiag(A) · dropout(x)`` by the fastest exact formulation.

    Shapes: ``x`` ``(..., d_in)``; ``lora_A`` ``(n, r, d_in/n)``; ``lora_B`` ``(n, d_out/n, r)``;
    output ``(..., d_out)``. ``path``: ``"auto"`` (:func:`choose_formulation`) or one of ``FORMULATIONS``.
    """
    path = resolve_formulation(path, x, base_layer, lora_A, lora_B)
    if path in FUSED_PATHS:
        return fused_forward(x, base_layer, lora_A, lora_B, scaling, dropout, path)
    return add_adapter_output(base_layer(x), dropout(x), lora_A, lora_B, scaling, path)
