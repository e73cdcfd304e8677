"""Put adapters into any PyTorch / Hugging Face model, describe them, merge them away.

Targets are found by module path and replaced in their parent
(``setattr(parent, child, wrapper)``); freezing is by type: every parameter of
the model is frozen, then the adapter parameters of the inserted layers and
the parameters of ``modules_to_save`` are unfrozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from melora.adapters.config import AdaLoRAConfig, AdapterConfig
from melora.adapters.layer import AdapterLayer, MELoRALinear, is_adaptable, linear_dims
from melora.adapters.methods import AdaLoRAMethod, adapter_layers, get_method

CONFIG_ATTR = "melora_config"


def matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a list matches by full name or ``.``-suffix, a string by regex fullmatch."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_adaptable(m)]


def _describe_linear_names(model: nn.Module, limit: int = 12) -> str:
    names = linear_layer_names(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")
    return f"the model's linear layers are: {shown}; their last names: {suffixes}"


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Module paths of the layers ``config.target_modules`` selects.

    Raises:
        ValueError: nothing matches (the message lists the linear layers), or a
            match is not a linear layer.
    """
    found = []
    for name, module in model.named_modules():
        if not name or not matches(name, config.target_modules):
            continue
        if isinstance(module, AdapterLayer):
            raise ValueError(f"layer '{name}' already has an adapter; inject into a fresh base model")
        if not is_adaptable(module):
            raise ValueError(
                f"target_modules={config.target_modules!r} matched '{name}', a {type(module).__name__}, "
                "not an nn.Linear/Conv1D; name the linear layers inside it instead"
            )
        found.append(name)
    if not found:
        raise ValueError(f"target_modules={config.target_modules!r} matched no layer; {_describe_linear_names(model)}")
    return found


def find_modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    found = []
    for pattern in config.modules_to_save:
        hits = [name for name, _ in model.named_modules() if name and matches(name, [pattern])]
        if not hits:
            top = [name for name, _ in model.named_children()]
            raise ValueError(f"modules_to_save entry '{pattern}' matched no module; top-level modules: {top}")
        found.extend(h for h in hits if not any(h.startswith(f + ".") for f in found))
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def inject(model: nn.Module, config: AdapterConfig, seed: int = 0) -> nn.Module:
    """Add the adapters ``config`` describes to ``model`` and freeze the rest.

    Args:
        model: Any ``nn.Module`` (a transformers model, typically); modified in
            place.
        config: ``MELoRAConfig``, ``LoRAConfig``, ``DyLoRAConfig``,
            ``DeltaLoRAConfig`` or ``AdaLoRAConfig``.
        seed: Seeds DyLoRA's per-step rank draws. ``A`` is initialised from
            the global RNG: call ``torch.manual_seed`` first for a fixed init.

    Returns:
        The same model with adapter layers in place (for AdaLoRA, PEFT's
        ``PeftModel`` wrapping it). ``model.melora_config`` holds ``config``.
    """
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("this model already has adapters; merge_and_unload() it or start from a fresh base model")
    if isinstance(config, AdaLoRAConfig):
        return _inject_adalora(model, config)
    targets = find_targets(model, config)
    saved = find_modules_to_save(model, config)
    method = get_method(config, seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        # A new module starts in training mode; follow the model's mode (dropout!).
        _set_submodule(model, name, method.make_layer(base, name).train(base.training))
    for layer in adapter_layers(model).values():
        for p in layer.adapter_parameters().values():
            p.requires_grad_(True)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    return model


def _inject_adalora(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    import peft

    find_targets(model, config)  # same validation and error messages as the other methods
    find_modules_to_save(model, config)
    peft_model = peft.get_peft_model(model, AdaLoRAMethod(config).peft_config())
    setattr(peft_model, CONFIG_ATTR, config)
    return peft_model


def get_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("this model has no melora adapters; call melora.inject(model, config) first")
    return config


def unwrap_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    import peft

    if isinstance(model, peft.PeftModel):
        return model.base_model.model
    return model


@dataclass
class LayerSummary:
    name: str
    kind: str
    d_in: int
    d_out: int
    n: int
    r: int
    equivalent_rank: int
    trainable_params: int


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


def layer_summary(name: str, module: nn.Module) -> LayerSummary | None:
    if isinstance(module, MELoRALinear):
        n, r = module.n, module.r
    elif isinstance(module, AdapterLayer):  # DyLoRA: report the maximum rank
        n, r = 1, module.r
    else:
        try:
            from peft.tuners.adalora import AdaLoraLayer
        except ImportError:  # pragma: no cover
            return None
        if not isinstance(module, AdaLoraLayer):
            return None
        n, r = 1, int(module.ranknum["default"].item())
        params = sum(p.numel() for d in (module.lora_A, module.lora_B, module.lora_E) for p in d.parameters())
        d_in, d_out = linear_dims(module.get_base_layer())
        return LayerSummary(name, "adalora", d_in, d_out, n, r, r, params)
    params = sum(p.numel() for p in module.adapter_parameters().values())
    return LayerSummary(name, type(module).__name__, module.d_in, module.d_out, n, r, n * r, params)


def describe(model: nn.Module) -> AdapterSummary:
    """Trainable parameters and equivalent rank of every adapted layer."""
    config = get_config(model)
    summary = AdapterSummary(method=config.method)
    for name, module in model.named_modules():
        layer = layer_summary(name, module)
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
    config = get_config(model)
    if isinstance(config, AdaLoRAConfig):
        merged = model.merge_and_unload(safe_merge=safe_merge)
    else:
        for name, layer in adapter_layers(model).items():
            layer.merge(safe_merge=safe_merge)
            _set_submodule(model, name, layer.base_layer)
        merged = model
    if CONFIG_ATTR in merged.__dict__:
        del merged.__dict__[CONFIG_ATTR]
    return merged
