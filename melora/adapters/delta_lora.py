"""Delta-LoRA (Zi et al. 2023): LoRA whose product's change is also written into ``W``.

Not a registered PEFT method, on purpose: training moves the frozen base weight
itself, and PEFT's adapter files hold adapter parameters only (a PEFT Delta-LoRA
adapter would load onto the original ``W`` and give other outputs); its update
also needs the hooks around each optimiser step that a PEFT tuner lacks. Its
layer is MELoRA's with ``n = 1``; ``melora.save_adapter`` stores the moved ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from melora.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod, adapter_layers, check_positive_int, register
from melora.adapters.melora import MELoRALinear


@dataclass
class DeltaLoRAConfig(AdapterConfig):
    """Delta-LoRA (Zi et al. 2023): LoRA whose product's change also updates ``W``.

    After each optimiser step ``t ≥ update_start_step``:
    ``W ← W + λ · s · (B_{t+1} A_{t+1} − B_t A_t)``. The paper drops the
    adapter dropout (it would make the delta inconsistent with ``W``'s gradient).

    Attributes:
        r, alpha: LoRA rank and scaling numerator (``s = alpha / r``).
        delta_lambda: ``λ``, the update ratio (paper: 2 for most GLUE tasks).
        update_start_step: ``K``, warm-up steps before ``W`` starts moving.
    """

    method: ClassVar[str] = "delta_lora"
    display_name: ClassVar[str] = "Delta-LoRA"
    step_fields: ClassVar[tuple[str, ...]] = ("update_start_step",)

    r: int = 8
    alpha: float = 16.0
    delta_lambda: float = 2.0
    update_start_step: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if self.update_start_step < 0:
            raise ValueError(f"update_start_step must be >= 0, got {self.update_start_step}")


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


@register
class DeltaLoRAMethod(AdapterMethod):
    """Moves each frozen ``W`` by ``λ`` times its adapter's change, after step ``K``."""

    config_class = DeltaLoRAConfig
    config: DeltaLoRAConfig

    def make_layer(self, base_layer: nn.Module, name: str) -> DeltaLoRALinear:
        c = self.config
        return DeltaLoRALinear(base_layer, c.r, c.alpha, name=name)

    def _active(self, step: int) -> bool:
        return step >= self.config.update_start_step

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self._active(step):
            for layer in adapter_layers(model, DeltaLoRALinear).values():
                layer.snapshot()

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if self._active(step):
            for layer in adapter_layers(model, DeltaLoRALinear).values():
                layer.update_base_weight(self.config.delta_lambda)

    def layer_tensors(self, name: str, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        # Training moved W itself: the adapter is incomplete without it.
        return {**super().layer_tensors(name, layer), f"{name}.base_layer.weight": layer.base_layer.weight}
