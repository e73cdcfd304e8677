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
``lora_B: (n, d_out/n, r)``, and run as two batched matrix products over a
strided ``(n, T, ·)`` view, so the adapter costs ``r·(d_in + d_out)``
multiply-adds per token; the dense ``ΔW`` is built only for merging and
analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from melora.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod, _meta, check_dropout, check_positive_int, register

SCALINGS = ("per_mini", "equivalent", "rslora")
INITS = ("kaiming", "gaussian")


@dataclass
class MELoRAConfig(AdapterConfig):
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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n", self.n)
        check_positive_int("r", self.r)
        check_dropout(self.dropout)
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling={self.scaling!r} is unknown; choose one of {SCALINGS}")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is unknown; choose one of {INITS}")

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

    Raises:
        ValueError: if ``n`` does not divide ``d_in`` or ``d_out``.
    """

    adapter_param_names = ("lora_A", "lora_B")

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
        where = f" of layer '{name}'" if name else ""
        for dim_name, dim in (("d_in", self.d_in), ("d_out", self.d_out)):
            if dim % n:
                divisors = [k for k in range(1, min(dim, 64) + 1) if self.d_in % k == 0 and self.d_out % k == 0]
                raise ValueError(
                    f"{dim_name}={dim}{where} is not divisible by n={n}; choose n among the common "
                    f"divisors of d_in={self.d_in} and d_out={self.d_out}: {divisors}"
                )
        self.n, self.r, self.alpha = n, r, alpha
        self.scaling_rule = scaling
        self.scaling = scaling_factor(alpha, n, r, scaling)
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(n, r, self.d_in // n, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(n, self.d_out // n, r, dtype=weight.dtype, device=weight.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        """LoRA's initialisation, per mini LoRA: random ``A_i``, zero ``B_i``."""
        if init == "kaiming":
            # Fan-in of each A_i is d_in/n, so initialise block by block (a packed
            # (n, r, d_in/n) tensor would give kaiming a fan-in of r·d_in/n).
            for block in self.lora_A:
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # loralib / PEFT convention
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            raise ValueError(f"init={init!r} is unknown; choose 'kaiming' or 'gaussian'")
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return self.add_adapter_output(result, self.lora_dropout(x))

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result += s · concat_i(B_i A_i x_i)``, in place, without a Python loop.

        Args:
            result: Frozen output, ``(..., d_out)``, contiguous.
            x: Adapter input (after dropout), ``(..., d_in)``.
        """
        n, k, m = self.n, self.d_in // self.n, self.d_out // self.n
        if not result.is_contiguous():
            result = result.contiguous()
        x = x.to(self.lora_A.dtype)
        x_blocks = x.reshape(-1, n, k).transpose(0, 1)  # (n, T, d_in/n), strided view
        hidden = torch.bmm(x_blocks, self.lora_A.transpose(1, 2))  # (n, T, r)
        # Scale the small (n, T, r) intermediate rather than the (T, d_out) output.
        hidden = hidden * self.scaling
        out_blocks = result.view(-1, n, m).transpose(0, 1)  # (n, T, d_out/n), view of result
        out_blocks.baddbmm_(hidden.to(result.dtype), self.lora_B.transpose(1, 2).to(result.dtype))
        return result

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``ΔW = s · blockdiag(B_i A_i)``, ``(d_out, d_in)``.

        Computed in ``dtype``; by default float32 (float64 if the factors are).
        """
        dtype = dtype or torch.promote_types(self.lora_A.dtype, torch.float32)
        blocks = torch.bmm(self.lora_B.to(dtype), self.lora_A.to(dtype))  # (n, d_out/n, d_in/n)
        return torch.block_diag(*blocks) * self.scaling

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
