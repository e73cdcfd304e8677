"""DyLoRA (Valipour et al. 2023): one LoRA trained at every rank ``b ≤ r``.

Not a registered PEFT method, on purpose: its training draws a rank before every
optimiser step (``DyLoRAMethod.on_step_begin``), and a PEFT tuner has no step hook.
Handed to PEFT tools (``get_peft_model``, TRL's ``peft_config=``) it would train
silently as a plain rank-``r`` LoRA whenever the caller forgot ``MELoRACallback``.
``melora.inject`` plus our trainer or ``MELoRACallback`` always call the hook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from melora.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod, adapter_layers, check_dropout, check_positive_int, register


@dataclass
class DyLoRAConfig(AdapterConfig):
    """DyLoRA (Valipour et al. 2023): a LoRA trained at every rank ``b ≤ r``.

    Each training step samples ``b`` uniformly from ``{r_min..r}`` and uses
    only the first ``b`` rows of ``A`` and columns of ``B``, so that any prefix
    of the ranks is a working adapter; evaluation uses ``eval_rank``.

    Attributes:
        r: Maximum rank ``r_max``.
        r_min: Smallest rank sampled.
        alpha: Scaling numerator; the scale is ``alpha / b`` for the rank ``b``
            in use, as in the DyLoRA paper (Eq. 3: the truncated product is
            divided by ``b``).
        dropout: Dropout on the adapter input.
        frozen: The paper's "frozen" mode: only the ``b``-th row/column gets
            gradients, the lower ones are detached.
        eval_rank: Rank used outside training (``None``: ``r``).
    """

    method: ClassVar[str] = "dylora"
    display_name: ClassVar[str] = "DyLoRA"

    r: int = 8
    r_min: int = 1
    alpha: float = 16.0
    dropout: float = 0.05
    frozen: bool = False
    eval_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_positive_int("r_min", self.r_min)
        check_dropout(self.dropout)
        if self.r_min > self.r:
            raise ValueError(f"r_min={self.r_min} exceeds r={self.r}")
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
            raise ValueError(f"eval_rank={self.eval_rank} must be in [1, r={self.r}]")


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
        self.r, self.alpha, self.frozen = r, alpha, frozen  # describe() reports the maximum rank
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


@register
class DyLoRAMethod(AdapterMethod):
    """Samples one rank ``b ~ U{r_min..r}`` per optimiser step for all layers.

    The draw depends only on ``(seed, step)``, so a resumed run samples the
    same ranks as an uninterrupted one.
    """

    config_class = DyLoRAConfig
    config: DyLoRAConfig

    def make_layer(self, base_layer: nn.Module, name: str) -> DyLoRALinear:
        c = self.config
        return DyLoRALinear(base_layer, c.r, c.alpha, c.dropout, c.frozen, c.eval_rank, name=name)

    def sample_rank(self, step: int) -> int:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        c = self.config
        return int(torch.randint(c.r_min, c.r + 1, (1,), generator=generator))

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        b = self.sample_rank(step)
        for layer in adapter_layers(model, DyLoRALinear).values():
            layer.active_rank = b
