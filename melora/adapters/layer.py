"""The MELoRA layer: ``n`` mini LoRAs on the block diagonal of a frozen linear.

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
analysis. ``n = 1`` is exactly LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from melora.adapters.config import scaling_factor

try:  # GPT-2 style layers store the weight transposed, (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a core dependency
    Conv1D = ()


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or transformers ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if Conv1D and isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def is_adaptable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or bool(Conv1D and isinstance(layer, Conv1D))


class AdapterLayer(nn.Module):
    """Base class of every adapter wrapper: a frozen ``base_layer`` plus a delta.

    Subclasses implement ``delta_weight()`` (the dense update in ``W``'s
    ``(d_out, d_in)`` layout) and the adapter forward; merging is shared.
    """

    adapter_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.d_in, self.d_out = linear_dims(base_layer)
        self.base_layer = base_layer
        # Conv1D keeps W as (d_in, d_out): merging must transpose ΔW.
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        self.merged = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads ``layer.weight`` keeps working."""
        return self.base_layer.weight

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _delta_in_weight_layout(self) -> torch.Tensor:
        delta = self.delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add ``ΔW`` into the base weight; a no-op if already merged.

        Args:
            safe_merge: Compute the merged weight out of place first and refuse
                (``ValueError``) if it holds NaN or Inf, leaving ``W`` untouched.
        """
        if self.merged:
            return
        weight = self.base_layer.weight
        delta = self._delta_in_weight_layout()
        if safe_merge:
            merged = weight.float() + delta
            if not torch.isfinite(merged).all():
                raise ValueError("refusing to merge: W + ΔW holds NaN/Inf; the adapter weights are broken")
            weight.copy_(merged.to(weight.dtype))
        else:
            weight.add_(delta.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``ΔW`` from the base weight; a no-op if not merged."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_(self._delta_in_weight_layout().to(weight.dtype))
        self.merged = False

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self.adapter_param_names}


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

    @property
    def equivalent_rank(self) -> int:
        return self.n * self.r

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
