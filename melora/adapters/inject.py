"""Put adapters into any PyTorch / Hugging Face model, describe them, merge them away.

Targets are found by module path and replaced in their parent
(``setattr(parent, child, wrapper)``); freezing is by type: every parameter of
the model is frozen, then the adapter parameters of the inserted layers and
the parameters of ``modules_to_save`` are unfrozen. What differs between
methods (PEFT-injected AdaLoRA) is the method's to say (``melora.adapters.base``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from melora.adapters.base import AdapterConfig, AdapterMethod, LayerSummary, find_modules_to_save, find_targets, get_method

CONFIG_ATTR = "melora_config"


def inject(model: nn.Module, config: AdapterConfig, seed: int = 0) -> nn.Module:
    """Add the adapters ``config`` describes to ``model`` and freeze the rest.

    Args:
        model: Any ``nn.Module`` (a transformers model, typically); modified in
            place.
        config: ``MELoRAConfig``, ``LoRAConfig``, ``DyLoRAConfig``,
            ``DeltaLoRAConfig``, ``AdaLoRAConfig`` or any registered method's config.
        seed: Seeds a method's own draws (DyLoRA's per-step ranks). ``A`` is
            initialised from the global RNG: call ``torch.manual_seed`` first
            for a fixed init.

    Returns:
        The same model with adapter layers in place (for AdaLoRA, PEFT's
        ``PeftModel`` wrapping it). ``model.melora_config`` holds ``config``.
    """
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("this model already has adapters; merge_and_unload() it or start from a fresh base model")
    targets = find_targets(model, config)
    saved = find_modules_to_save(model, config)
    model = get_method(config, seed=seed).inject(model, targets, saved)
    setattr(model, CONFIG_ATTR, config)
    return model


def get_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("this model has no melora adapters; call melora.inject(model, config) first")
    return config


def method_of(model: nn.Module) -> AdapterMethod:
    """The method object of an injected model (hooks, saving, describing)."""
    return get_method(get_config(model))


def unwrap_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a method's wrapper (or ``model`` itself)."""
    config = getattr(model, CONFIG_ATTR, None)
    return model if config is None else get_method(config).base_model(model)


@dataclass
class AdapterSummary:
    """What ``describe`` reports; ``str()`` gives the table."""

    method: str
    layers: list[LayerSummary] = field(default_factory=list)
    adapter_params: int = 0
    saved_module_params: int = 0
    trainable_params: int = 0
    total_params: int = 0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        lines = [f"{'layer':<56} {'d_in':>6} {'d_out':>6} {'n':>4} {'r':>4} {'eq.rank':>8} {'params':>10}"]
        for l in self.layers:
            lines.append(
                f"{l.name:<56} {l.d_in:>6} {l.d_out:>6} {l.n:>4} {l.r:>4} {l.equivalent_rank:>8} {l.trainable_params:>10,}"
            )
        lines.append(
            f"method={self.method}: {len(self.layers)} adapted layers, adapter params {self.adapter_params:,}, "
            f"modules_to_save params {self.saved_module_params:,}; trainable {self.trainable_params:,} of "
            f"{self.total_params:,} ({self.trainable_percent:.4f}%)"
        )
        return "\n".join(lines)


def layer_summaries(model: nn.Module) -> list[LayerSummary]:
    """One ``LayerSummary`` per adapted layer, paths as in the transformers model."""
    method = method_of(model)
    summaries = (method.layer_summary(name, module) for name, module in method.base_model(model).named_modules())
    return [s for s in summaries if s is not None]


def describe(model: nn.Module) -> AdapterSummary:
    """Trainable parameters and equivalent rank of every adapted layer."""
    config = get_config(model)
    summary = AdapterSummary(method=config.method)
    method = get_method(config)
    for name, module in model.named_modules():
        layer = method.layer_summary(name, module)
        if layer is not None:
            summary.layers.append(layer)
    summary.adapter_params = sum(l.trainable_params for l in summary.layers)
    summary.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary.total_params = sum(p.numel() for p in model.parameters())
    summary.saved_module_params = summary.trainable_params - summary.adapter_params
    return summary


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layers back.

    Returns a model with the original module types and the same outputs (up
    to float rounding); inference then costs exactly the base model.
    """
    merged = method_of(model).merge_and_unload(model, safe_merge=safe_merge)
    if CONFIG_ATTR in merged.__dict__:
        del merged.__dict__[CONFIG_ATTR]
    return merged
