"""AdaLoRA (Zhang et al. 2023) through PEFT: SVD-form adapters with a reallocated rank budget.

PEFT injects and runs it (``peft.get_peft_model``); this file maps our config
onto ``peft.AdaLoraConfig`` and tells the rest of the library how to save,
describe and merge PEFT's layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from melora.adapters.base import AdapterConfig, AdapterMethod, LayerSummary, check_dropout, check_positive_int, linear_dims, register

# The tensors of an AdaLoRA adapter in PEFT's state dict.
_STATE_PARTS = ("lora_A", "lora_B", "lora_E", "ranknum", "modules_to_save")
# Fields that peft.AdaLoraConfig names as we do (alpha, dropout and modules_to_save are mapped by hand).
_PEFT_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step", "target_modules")


@dataclass
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA (Zhang et al. 2023) through ``peft.AdaLoraConfig``.

    SVD-form adapters whose rank budget is reallocated during training from
    ``init_r`` per layer down to an average ``target_r``. The trainer must call
    the method's ``on_step_end`` hook after each optimiser step (it runs PEFT's
    ``update_and_allocate``). ``total_step`` is filled in by the trainer.
    """

    method: ClassVar[str] = "adalora"
    display_name: ClassVar[str] = "AdaLoRA"
    step_fields: ClassVar[tuple[str, ...]] = ("tinit", "tfinal")
    total_steps_field: ClassVar[str | None] = "total_step"

    init_r: int = 12
    target_r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    total_step: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("init_r", self.init_r)
        check_positive_int("target_r", self.target_r)
        check_dropout(self.dropout)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} exceeds init_r={self.init_r}")

    @property
    def rank(self) -> int:
        return self.target_r


@register
class AdaLoRAMethod(AdapterMethod):
    """AdaLoRA from PEFT; injection goes through ``peft.get_peft_model``."""

    config_class = AdaLoRAConfig
    config: AdaLoRAConfig

    def peft_config(self):
        import peft

        c = self.config
        if not c.total_step:
            raise ValueError("AdaLoRA needs total_step (the number of optimiser steps); the trainer sets it, or pass it")
        same_names = {name: getattr(c, name) for name in _PEFT_FIELDS}
        return peft.AdaLoraConfig(
            **same_names, lora_alpha=c.alpha, lora_dropout=c.dropout, modules_to_save=c.modules_to_save or None
        )

    def on_step_end(self, model: nn.Module, step: int) -> None:
        # PEFT's budget allocator reads the gradients: run before zero_grad().
        tuner = getattr(model, "base_model", None)
        if tuner is None or not hasattr(tuner, "update_and_allocate"):
            raise TypeError("on_step_end expects the PeftModel returned by melora.inject for method 'adalora'")
        tuner.update_and_allocate(step)

    def inject(self, model: nn.Module, targets: list[str], saved: list[str]) -> nn.Module:
        import peft

        return peft.get_peft_model(model, self.peft_config())

    def merge_and_unload(self, model: nn.Module, safe_merge: bool = False) -> nn.Module:
        return model.merge_and_unload(safe_merge=safe_merge)

    def base_model(self, model: nn.Module) -> nn.Module:
        import peft

        return model.base_model.model if isinstance(model, peft.PeftModel) else model

    def layer_summary(self, name: str, module: nn.Module) -> LayerSummary | None:
        from peft.tuners.adalora import AdaLoraLayer

        if not isinstance(module, AdaLoraLayer):
            return None
        r = int(module.ranknum["default"].item())
        params = sum(p.numel() for d in (module.lora_A, module.lora_B, module.lora_E) for p in d.parameters())
        d_in, d_out = linear_dims(module.get_base_layer())
        return LayerSummary(name, "adalora", d_in, d_out, 1, r, r, params)

    def state_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # Full-size factors with the pruned singular values zero in lora_E; PEFT's
        # own state dict resizes them by a rank pattern that exists only at the end.
        return {k: v for k, v in model.state_dict().items() if any(f".{part}." in k for part in _STATE_PARTS)}
