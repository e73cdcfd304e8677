"""MELoRA (Ren et al., ACL 2024) and LoRA (Hu et al. 2021), its ``n = 1`` case.

::

        x (..., d_in) ──────────────── W (frozen) ───────────────┐
          │                                                      + ── h (..., d_out)
          └─ dropout ─ split into n chunks (d_in/n each)         │
                x_1 ── A_1 (r×d_in/n) ── B_1 (d_out/n×r) ──┐     │
                ...                                         concat · s
                x_n ── A_n ─────────────  B_n ─────────────┘

    h = W x + s · blockdiag(B_1..B_n) · blockdiag(A_1..A_n) · x

The mini LoRAs are stored packed, ``lora_A: (n, r, d_in/n)`` and
``lora_B: (n, d_out/n, r)``; :func:`reference_forward` and
:func:`delta_weight` are the whole method in a few lines. Layers compute the
same thing faster through :func:`melora.adapters.formulations.forward`
(exact formulations, one picked per call by a cost rule). The PEFT method
(``get_peft_model(model, MELoRAConfig(...))``) is in
``melora.adapters.peft_melora``; :class:`MELoRALinear` is the single-adapter
layer of ``melora.inject``. Both call the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
from peft.config import PeftConfig

from melora.adapters import formulations
from melora.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod, _meta, check_dropout, check_positive_int, register
from melora.adapters.formulations import PATHS, block_diagonal, choose_path, group_count  # noqa: F401 - the layer's public API

SCALINGS = ("per_mini", "equivalent", "rslora")
INITS = ("kaiming", "gaussian")
PEFT_TYPE = "MELORA"  # PEFT's name of the method (melora.adapters.peft_melora registers it)


# ---- the method in a few lines ----------------------------------------------------


def reference_forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``h = W x + s · concat_i(B_i A_i x_i)``: the definition, for reading and for tests.

    Shapes: ``x`` ``(..., d_in)``; ``weight`` ``(d_out, d_in)``; ``lora_A``
    ``(n, r, d_in/n)``; ``lora_B`` ``(n, d_out/n, r)``; output ``(..., d_out)``.
    """
    n = lora_A.shape[0]
    chunks = x.unflatten(-1, (n, -1))  # (..., n, d_in/n): x_1..x_n
    hidden = torch.einsum("...nk,nrk->...nr", chunks, lora_A)  # A_i x_i: (..., n, r)
    mini = torch.einsum("...nr,nmr->...nm", hidden, lora_B)  # B_i A_i x_i: (..., n, d_out/n)
    return x @ weight.T + scaling * mini.flatten(-2)


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``ΔW = s · blockdiag(B_1 A_1, .., B_n A_n)``, ``(d_out, d_in)``: what merging adds to ``W``.

    Computed in ``dtype``; by default float32 (float64 if the factors are).
    """
    dtype = dtype or torch.promote_types(lora_A.dtype, torch.float32)
    blocks = torch.bmm(lora_B.to(dtype), lora_A.to(dtype))  # (n, d_out/n, d_in/n)
    return torch.block_diag(*blocks) * scaling


@torch.no_grad()
def init_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, init: str = "kaiming") -> None:
    """LoRA's initialisation, per mini LoRA: random ``A_i``, zero ``B_i`` (so ``ΔW = 0`` at the start)."""
    if init == "kaiming":
        # Fan-in of each A_i is d_in/n, so initialise block by block (a packed
        # (n, r, d_in/n) tensor would give kaiming a fan-in of r·d_in/n).
        for block in lora_A:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # loralib / PEFT convention
    elif init == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / lora_A.shape[1])
    else:
        raise ValueError(f"init={init!r} is unknown; choose 'kaiming' or 'gaussian'")
    nn.init.zeros_(lora_B)


def check_divides(n: int, d_in: int, d_out: int, name: str = "") -> None:
    """Raise a ``ValueError`` naming the choices when ``n`` does not divide both dimensions of a layer."""
    where = f" of layer '{name}'" if name else ""
    for dim_name, dim in (("d_in", d_in), ("d_out", d_out)):
        if dim % n:
            divisors = [k for k in range(1, min(dim, 64) + 1) if d_in % k == 0 and d_out % k == 0]
            raise ValueError(
                f"{dim_name}={dim}{where} is not divisible by n={n}; choose n among the common "
                f"divisors of d_in={d_in} and d_out={d_out}: {divisors}"
            )


# ---- configs ------------------------------------------------------------------------


@dataclass
class MELoRAConfig(AdapterConfig, PeftConfig):
    """MELoRA: ``n`` mini LoRAs of rank ``r`` on the block diagonal.

    ``ΔW = s · blockdiag(B_1..B_n) · blockdiag(A_1..A_n)`` has rank ``n·r`` and
    ``(d_in + d_out)·r`` trainable parameters per layer. ``n = 1`` is LoRA.

    Attributes:
        n: Number of mini LoRAs; must divide ``d_in`` and ``d_out`` of every
            target layer.
        r: Rank of each mini LoRA (equivalent rank ``n·r``).
        alpha: Scaling numerator.
        dropout: Dropout on the adapter input.
        scaling: ``"per_mini"``: ``s = alpha / r`` (the official implementation
            gives each mini LoRA ``alpha / r``; default); ``"equivalent"``:
            ``alpha / (n·r)``, LoRA's convention at the equivalent rank;
            ``"rslora"``: ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        init: ``"kaiming"`` (Kaiming-uniform ``A_i`` with ``a = sqrt(5)``, as
            loralib and PEFT) or ``"gaussian"`` (``A_i ~ N(0, 1/r²)``, PEFT's
            ``init_lora_weights="gaussian"``). ``B_i`` is always zero.
        exclude_modules: Layers never to adapt (PEFT's rule; ``None``: none).

    It is also a PEFT config: ``peft.get_peft_model(model, MELoRAConfig(...))``
    (after ``import melora``), with PEFT's ``task_type``, ``inference_mode`` and
    ``base_model_name_or_path``; ``to_dict()`` is PEFT's ``adapter_config.json``.
    """

    method: ClassVar[str] = "melora"
    display_name: ClassVar[str] = "MELoRA"
    has_spectra: ClassVar[bool] = True

    n: int = field(default=8, metadata=_meta("number of mini LoRAs"))
    r: int = field(default=1, metadata=_meta("rank of each mini LoRA"))
    alpha: float = field(default=16.0, metadata=_meta("scaling numerator"))
    dropout: float = field(default=0.05, metadata=_meta("dropout on the adapter input"))
    scaling: str = field(default="per_mini", metadata=_meta("per_mini: alpha/r | equivalent: alpha/(n r) | rslora: alpha/sqrt(r)"))
    init: str = field(default="kaiming", metadata=_meta("kaiming | gaussian (A); B is zero"))
    exclude_modules: list[str] | str | None = field(default=None, metadata=_meta("layers never to adapt (PEFT's rule)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_positive_int("n", self.n)
        check_positive_int("r", self.r)
        check_dropout(self.dropout)
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling={self.scaling!r} is unknown; choose one of {SCALINGS}")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is unknown; choose one of {INITS}")

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` dict (``as_record()``: the hyper-parameters of a run record)."""
        return PeftConfig.to_dict(self)

    @property
    def equivalent_rank(self) -> int:
        return self.n * self.r

    @property
    def scale(self) -> float:
        """The factor ``s`` multiplying ``ΔW``."""
        return scaling_factor(self.alpha, self.n, self.r, self.scaling)

    @property
    def blocks(self) -> int:
        return self.n

    def row_name(self) -> str:
        # Another scaling convention is another method (the scaling study), not a setting to pick among.
        variant = f" ({self.scaling})" if self.scaling != "per_mini" else ""
        return f"{self.display_name} r={self.r}{variant}"

    def choice_name(self) -> str:
        return f"n={self.n}"


def scaling_factor(alpha: float, n: int, r: int, rule: str) -> float:
    """``s`` for a MELoRA layer with ``n`` mini LoRAs of rank ``r``."""
    if rule == "per_mini":
        return alpha / r
    if rule == "equivalent":
        return alpha / (n * r)
    if rule == "rslora":
        return alpha / math.sqrt(r)
    raise ValueError(f"scaling={rule!r} is unknown; choose one of {SCALINGS}")


@dataclass
class LoRAConfig(MELoRAConfig):
    """LoRA (Hu et al. 2021): MELoRA with a single mini LoRA (``n = 1``)."""

    method: ClassVar[str] = "lora"
    display_name: ClassVar[str] = "LoRA"

    n: int = 1
    r: int = 8

    def __post_init__(self) -> None:
        if self.n != 1:
            raise ValueError(f"LoRA has n=1 by definition, got n={self.n}; use MELoRAConfig for n > 1")
        super().__post_init__()

    def choice_name(self) -> str:
        return "-"


class MELoRALinear(AdapterLayer):
    """A frozen linear layer plus ``n`` mini LoRAs of rank ``r`` on the diagonal.

    Args:
        base_layer: ``nn.Linear`` (weight ``(d_out, d_in)``) or transformers
            ``Conv1D`` (weight ``(d_in, d_out)``); frozen and kept as
            ``self.base_layer``.
        n: Number of mini LoRAs; must divide ``d_in`` and ``d_out``.
        r: Rank of each mini LoRA.
        alpha: Scaling numerator.
        dropout: Dropout probability on the adapter input.
        scaling: Rule for ``s``: ``"per_mini"`` (``alpha/r``), ``"equivalent"``
            (``alpha/(n·r)``) or ``"rslora"`` (``alpha/sqrt(r)``).
        init: ``"kaiming"`` or ``"gaussian"`` for each ``A_i``; ``B_i = 0``.
        name: Module path, used in error messages.

    Shapes:
        ``lora_A``: ``(n, r, d_in/n)``; ``lora_B``: ``(n, d_out/n, r)``;
        input ``(..., d_in)`` → output ``(..., d_out)``.

    Formulation:
        ``layer.path`` is ``"auto"`` (default: :func:`choose_path` picks per
        call from ``(d_in, d_out, n, r, tokens, dtype, device)`` and whether
        gradients are needed) or one of ``PATHS`` to force it, e.g.
        ``layer.path = "dense"``; every path gives the same output and
        gradients up to rounding.

    Precision:
        The frozen output keeps its dtype (under autocast, the autocast dtype,
        as the base layer's product). The first adapter product runs in the
        autocast dtype under ``torch.autocast``, else in the factors' dtype;
        the second product and the addition run in the frozen output's dtype.
        So under bf16 autocast all adapter math is bf16, as PEFT's LoRA under
        autocast, while the factors and their gradients stay in their own
        dtype (fp32 master weights).

    Raises:
        ValueError: if ``n`` does not divide ``d_in`` or ``d_out``.
    """

    adapter_param_names = ("lora_A", "lora_B")
    path: str = "auto"

    def __init__(
        self,
        base_layer: nn.Module,
        n: int,
        r: int,
        alpha: float = 16.0,
        dropout: float = 0.0,
        scaling: str = "per_mini",
        init: str = "kaiming",
        name: str = "",
    ) -> None:
        super().__init__(base_layer)
        check_divides(n, self.d_in, self.d_out, name)
        self.n, self.r, self.alpha = n, r, alpha
        self.scaling_rule = scaling
        self.scaling = scaling_factor(alpha, n, r, scaling)
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(n, r, self.d_in // n, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(n, self.d_out // n, r, dtype=weight.dtype, device=weight.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        """LoRA's initialisation, per mini LoRA: random ``A_i``, zero ``B_i``."""
        init_factors(self.lora_A, self.lora_B, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return formulations.forward(x, self.base_layer, self.lora_A, self.lora_B, self.scaling, self.lora_dropout, self.path)

    def path_for(self, x: torch.Tensor) -> str:
        """The formulation this layer uses for input ``x``: ``self.path``, or :func:`choose_path`'s."""
        return formulations.resolve_path(self.path, x, self.base_layer, self.lora_A, self.lora_B)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """``result += s · concat_i(B_i A_i x_i)`` in place (``path``: ``"dense"`` or the ``"bmm"`` products)."""
        return formulations.add_adapter_output(result, x, self.lora_A, self.lora_B, self.scaling, path or self.path_for(x))

    def dense_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``blockdiag(A_1..A_n)`` ``(n·r, d_in)`` and ``blockdiag(B_1..B_n)`` ``(d_out, n·r)``, differentiable."""
        return block_diagonal(self.lora_A), block_diagonal(self.lora_B)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``ΔW = s · blockdiag(B_i A_i)``, ``(d_out, d_in)`` (float32 by default; float64 if the factors are)."""
        return delta_weight(self.lora_A, self.lora_B, self.scaling, dtype)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, n={self.n}, r={self.r}, "
            f"equivalent_rank={self.equivalent_rank}, scaling={self.scaling:g}"
        )


@register
class MELoRAMethod(AdapterMethod):
    """MELoRA needs no training hooks; its update is a LoRA of rank ``n·r``."""

    config_class = MELoRAConfig
    config: MELoRAConfig

    def make_layer(self, base_layer: nn.Module, name: str) -> MELoRALinear:
        c = self.config
        return MELoRALinear(base_layer, c.n, c.r, c.alpha, c.dropout, c.scaling, c.init, name=name)

    def lora_factors(self, layer: MELoRALinear) -> tuple[torch.Tensor, torch.Tensor, float]:
        # ΔW = s·blockdiag(B_i)·blockdiag(A_i): a LoRA of rank n·r whose factors are zero off the diagonal.
        return torch.block_diag(*layer.lora_A.detach()), torch.block_diag(*layer.lora_B.detach()), layer.scaling


@register
class LoRAMethod(MELoRAMethod):
    config_class = LoRAConfig
