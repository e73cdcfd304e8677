"""Adapter methods behind one interface: build layers, and the trainer's hooks.

A trainer drives every method the same way::

    method = get_method(config)
    for step, batch in enumerate(loader):
        method.on_step_begin(model, step)          # DyLoRA: sample this step's rank
        loss = model(**batch).loss; loss.backward()
        method.before_optimizer_step(model, step)  # Delta-LoRA: remember (A_t, B_t)
        optimizer.step()
        method.on_step_end(model, step)            # AdaLoRA: reallocate; Delta-LoRA: move W
        optimizer.zero_grad()

``step`` counts optimiser steps from 0. Hooks that a method does not need do
nothing, so LoRA/MELoRA runs pay nothing for them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from melora.adapters.baselines import DeltaLoRALinear, DyLoRALinear
from melora.adapters.config import (
    AdaLoRAConfig,
    AdapterConfig,
    DeltaLoRAConfig,
    DyLoRAConfig,
    LoRAConfig,
    MELoRAConfig,
)
from melora.adapters.layer import AdapterLayer, MELoRALinear


class AdapterMethod:
    """Base: builds one adapter layer per target and exposes no-op hooks."""

    def __init__(self, config: AdapterConfig) -> None:
        self.config = config

    def make_layer(self, base_layer: nn.Module, name: str) -> AdapterLayer:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        """Before the forward pass of optimiser step ``step``."""

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """After ``backward()``, before ``optimizer.step()``."""

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """After ``optimizer.step()``, before ``optimizer.zero_grad()``."""


def adapter_layers(model: nn.Module, kind: type[AdapterLayer] = AdapterLayer) -> dict[str, AdapterLayer]:
    """Adapted layers of ``model`` by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


class MELoRAMethod(AdapterMethod):
    config: MELoRAConfig

    def make_layer(self, base_layer: nn.Module, name: str) -> MELoRALinear:
        c = self.config
        return MELoRALinear(base_layer, c.n, c.r, c.alpha, c.dropout, c.scaling, c.init, name=name)


class DyLoRAMethod(AdapterMethod):
    """Samples one rank ``b ~ U{r_min..r}`` per optimiser step for all layers.

    The draw depends only on ``(seed, step)``, so a resumed run samples the
    same ranks as an uninterrupted one.
    """

    config: DyLoRAConfig

    def __init__(self, config: DyLoRAConfig, seed: int = 0) -> None:
        super().__init__(config)
        self.seed = seed

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


class DeltaLoRAMethod(AdapterMethod):
    """Moves each frozen ``W`` by ``λ`` times its adapter's change, after step ``K``."""

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


class AdaLoRAMethod(AdapterMethod):
    """AdaLoRA from PEFT; injection goes through ``peft.get_peft_model``."""

    config: AdaLoRAConfig

    def peft_config(self):
        import peft

        c = self.config
        if not c.total_step:
            raise ValueError("AdaLoRA needs total_step (the number of optimiser steps); the trainer sets it, or pass it")
        return peft.AdaLoraConfig(
            init_r=c.init_r,
            target_r=c.target_r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            tinit=c.tinit,
            tfinal=c.tfinal,
            deltaT=c.deltaT,
            beta1=c.beta1,
            beta2=c.beta2,
            orth_reg_weight=c.orth_reg_weight,
            total_step=c.total_step,
            target_modules=c.target_modules,
            modules_to_save=c.modules_to_save or None,
        )

    def on_step_end(self, model: nn.Module, step: int) -> None:
        # PEFT's budget allocator reads the gradients: run before zero_grad().
        tuner = getattr(model, "base_model", None)
        if tuner is None or not hasattr(tuner, "update_and_allocate"):
            raise TypeError("on_step_end expects the PeftModel returned by melora.inject for method 'adalora'")
        tuner.update_and_allocate(step)


METHODS: dict[type[AdapterConfig], type[AdapterMethod]] = {
    MELoRAConfig: MELoRAMethod,
    LoRAConfig: MELoRAMethod,
    DyLoRAConfig: DyLoRAMethod,
    DeltaLoRAConfig: DeltaLoRAMethod,
    AdaLoRAConfig: AdaLoRAMethod,
}


def get_method(config: AdapterConfig, seed: int = 0) -> AdapterMethod:
    """The method object (layer factory + training hooks) for ``config``."""
    cls = METHODS.get(type(config))
    if cls is None:
        raise TypeError(f"no adapter method for {type(config).__name__}")
    return cls(config, seed=seed) if cls is DyLoRAMethod else cls(config)
