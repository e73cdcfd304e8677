"""Baseline adapter layers of the paper's Table 2 that PEFT does not provide.

- ``DyLoRALinear`` (Valipour et al. 2023): one LoRA trained at every rank.
- ``DeltaLoRALinear`` (Zi et al. 2023): LoRA whose product's change is also
  written into the frozen weight.

AdaLoRA comes from PEFT (see ``melora.adapters.methods``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from melora.adapters.layer import AdapterLayer, MELoRALinear


class DyLoRALinear(AdapterLayer):
    """LoRA with nested ranks: at rank ``b`` only ``A[:b]`` and ``B[:, :b]`` act.

    ``h = W x + (alpha / b) · B[:, :b] A[:b] dropout(x)``

    During training the method hook sets ``active_rank`` to a freshly sampled
    ``b`` every step; outside training the layer uses ``eval_rank``.

    Shapes:
        ``lora_A``: ``(r, d_in)``; ``lora_B``: ``(d_out, r)``.
    """

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float = 16.0,
        dropout: float = 0.0,
        frozen: bool = False,
        eval_rank: int | None = None,
        name: str = "",
    ) -> None:
        super().__init__(base_layer)
        self.r, self.alpha, self.frozen = r, alpha, frozen
        self.eval_rank = eval_rank or r
        self.active_rank = r
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank_in_use(self) -> int:
        return self.active_rank if self.training else self.eval_rank

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank_in_use

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.rank_in_use
        A, B = self.lora_A[:b], self.lora_B[:, :b]  # (b, d_in), (d_out, b)
        if self.frozen and self.training and b > 1:
            # "Frozen" DyLoRA: ranks below b were trained at earlier steps and
            # only the b-th row/column learns now.
            A = torch.cat([A[:-1].detach(), A[-1:]], dim=0)
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], dim=1)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        A, B = self._factors()
        x = self.lora_dropout(x).to(A.dtype)
        return result + (F.linear(F.linear(x, A), B) * self.scaling).to(result.dtype)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(alpha/b) · B[:, :b] A[:b]`` at the rank in use, ``(d_out, d_in)``, float32 by default."""
        A, B = self._factors()
        dtype = dtype or torch.promote_types(A.dtype, torch.float32)
        return (B.to(dtype) @ A.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r_max={self.r}, eval_rank={self.eval_rank}, frozen={self.frozen}"


class DeltaLoRALinear(MELoRALinear):
    """LoRA (``n = 1``, no dropout) that also moves ``W`` by its product's change.

    The method hook calls ``snapshot()`` before each optimiser step and
    ``update_base_weight(λ)`` after it:
    ``W ← W + λ · s · (B_{t+1} A_{t+1} − B_t A_t)``.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float = 16.0, name: str = "") -> None:
        super().__init__(base_layer, n=1, r=r, alpha=alpha, dropout=0.0, scaling="per_mini", name=name)
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember ``(A_t, B_t)``; factors are small, the dense product is not."""
        self._previous = (self.lora_A.detach().clone(), self.lora_B.detach().clone())

    @torch.no_grad()
    def update_base_weight(self, delta_lambda: float) -> None:
        """``W += λ · s · (B_{t+1} A_{t+1} − B_t A_t)`` using the last snapshot."""
        if self._previous is None:
            raise RuntimeError("update_base_weight() needs snapshot() before the optimiser step")
        if self.merged:
            raise RuntimeError("cannot update W of a merged Delta-LoRA layer; unmerge() first")
        A_prev, B_prev = self._previous
        dtype = torch.promote_types(A_prev.dtype, torch.float32)
        change = self.lora_B[0].to(dtype) @ self.lora_A[0].to(dtype) - B_prev[0].to(dtype) @ A_prev[0].to(dtype)
        change = change * (delta_lambda * self.scaling)  # (d_out, d_in)
        weight = self.base_layer.weight
        weight.add_((change.T if self.fan_in_fan_out else change).to(weight.dtype))
        self._previous = None
