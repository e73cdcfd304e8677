"""What every adapter method shares, and the registry that names them.

A method is one file in this folder holding three things:

- a config, an ``AdapterConfig`` dataclass: the method's hyper-parameters,
  validated in ``__post_init__``, plus class-level facts the rest of the code
  asks for (``method``, ``display_name``, ``step_fields``, ``rank``);
- a layer, an ``AdapterLayer``: a frozen ``base_layer`` plus the adapter's
  forward and its dense ``delta_weight()``;
- an ``AdapterMethod`` registered with ``@register``: builds the layer and
  holds the trainer's hooks. Injection, saving, describing and merging have
  defaults here that a method overrides only if it differs (AdaLoRA, which
  PEFT injects, overrides most of them).

Nothing outside a method's file switches on its type: ``inject``, ``io``, the
experiment and the report ask the config or the method.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

try:  # GPT-2 style layers store the weight transposed, (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a core dependency
    Conv1D = ()


# ---- configs -----------------------------------------------------------------


def _meta(help_text: str) -> dict:
    return {"help": help_text}


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {value}")


@dataclass
class AdapterConfig:
    """Fields shared by every adapter method.

    Attributes:
        target_modules: Layers to adapt. A list of names matches a module whose
            full path equals a name or ends with ``"." + name`` (``["query",
            "value"]``); a single string is a regular expression that must
            match the full path (``r".*\\.(q|v)_proj"``).
        modules_to_save: Modules trained fully and saved with the adapter
            (e.g. the fresh classification head), matched like
            ``target_modules`` given as a list.

    Class attributes a method sets:
        method: Registry name, used by saved adapters, records and Hydra.
        display_name: Name in tables and figures.
        step_fields: Fields counted in optimiser steps that a run config may
            give as a fraction of the run's steps (``0 < value < 1``).
        total_steps_field: Field that must hold the run's number of steps
            (AdaLoRA's ``total_step``), or ``None``.
        has_spectra: Whether the adapter's ``ΔW`` is the whole update of the
            layer, so that its singular values describe what was learned.
    """

    method: ClassVar[str] = "base"
    display_name: ClassVar[str] = "base"
    step_fields: ClassVar[tuple[str, ...]] = ()
    total_steps_field: ClassVar[str | None] = None
    has_spectra: ClassVar[bool] = False

    target_modules: list[str] | str = field(
        default_factory=lambda: ["query", "value"],
        metadata=_meta("layer names (suffix match) or one regex (full match)"),
    )
    modules_to_save: list[str] = field(
        default_factory=list, metadata=_meta("modules trained in full and saved, e.g. ['classifier']")
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, list)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty: name at least one layer, e.g. ['query', 'value']")
        elif not isinstance(self.target_modules, str):
            raise TypeError(f"target_modules must be a list of names or a regex string, got {type(self.target_modules).__name__}")
        self.modules_to_save = list(self.modules_to_save or [])
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # a config that is also a PEFT config (MELoRA) runs PEFT's checks too
            parent()

    def as_record(self) -> dict[str, Any]:
        """The method name plus its hyper-parameters, JSON-ready: a run record's ``method_config``.

        A PEFT config's bookkeeping (``peft_type``, ``task_type``, ``peft_version``, …) is left out.
        """
        bookkeeping = _peft_bookkeeping()
        return {"method": self.method, **{k: v for k, v in dataclasses.asdict(self).items() if k not in bookkeeping}}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus the method name (a PEFT config: PEFT's ``adapter_config.json`` dict)."""
        return self.as_record()

    @classmethod
    def for_run(cls, fields: dict[str, Any], total_steps: int | None) -> "AdapterConfig":
        """The config of a run of ``total_steps`` optimiser steps.

        ``step_fields`` below 1 become that fraction of ``total_steps``;
        ``total_steps_field`` is filled in.
        """
        fields = dict(fields)
        for key in cls.step_fields:
            value = fields.get(key)
            if value is not None and 0 < value < 1:
                if total_steps is None:
                    raise ValueError(f"method.{key}={value} is a fraction of the run's steps; total_steps is needed")
                fields[key] = int(round(value * total_steps))
            elif value is not None:
                fields[key] = int(value)
        if cls.total_steps_field:
            fields[cls.total_steps_field] = total_steps
        return cls(**fields)

    # What tables call a setting. A method with other knobs overrides these.
    @property
    def rank(self) -> int:
        """Rank of one (mini) adapter: a Table 2 row is ``display_name r=rank``."""
        return self.r  # type: ignore[attr-defined]

    @property
    def blocks(self) -> int:
        """Number of mini adapters on the block diagonal (1: a plain LoRA-shaped update)."""
        return 1

    def row_name(self) -> str:
        """The Table 2 row of this config, e.g. ``"MELoRA r=1"``."""
        return f"{self.display_name} r={self.rank}"

    def choice_name(self) -> str:
        """What a row chooses among (MELoRA: ``"n=8"``); ``"-"`` when a row is one setting."""
        return "-"

    def label(self) -> str:
        """A setting's full name: its row plus its choice, e.g. ``"MELoRA n=8 r=1"``."""
        choice = self.choice_name()
        if choice == "-":
            return self.row_name()
        name, _, rest = self.row_name().partition(" ")
        return f"{name} {choice} {rest}"


def _peft_bookkeeping() -> set[str]:
    """The fields every PEFT config has that are not a method's hyper-parameters."""
    from peft.config import PeftConfig

    return {f.name for f in dataclasses.fields(PeftConfig)}


# ---- layers ------------------------------------------------------------------


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
    ``n`` and ``r`` (class defaults 1 and 0) are what ``describe`` reports.
    """

    adapter_param_names: tuple[str, ...] = ()
    n: int = 1
    r: int = 0

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

    @property
    def equivalent_rank(self) -> int:
        return self.n * self.r

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


# Adapter layer classes. MELoRA's layer is PEFT's tuner layer (a BaseTunerLayer, not an AdapterLayer
# subclass: the two disagree on what `merged` is); its method file adds it here.
ADAPTER_LAYER_TYPES: list[type] = [AdapterLayer]


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` is an adapter layer of any registered kind."""
    return isinstance(module, tuple(ADAPTER_LAYER_TYPES))


def adapter_layers(model: nn.Module, kind: type | None = None) -> dict[str, AdapterLayer]:
    """Adapted layers of ``model`` by module path (of ``kind``; default: every adapter layer)."""
    kinds = kind or tuple(ADAPTER_LAYER_TYPES)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


# ---- finding the layers to adapt ----------------------------------------------


def matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a list matches by full name or ``.``-suffix, a string by regex fullmatch."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _describe_linear_names(model: nn.Module, limit: int = 12) -> str:
    names = [name for name, m in model.named_modules() if is_adaptable(m)]
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
        if is_adapter_layer(module):
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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


@dataclass
class LayerSummary:
    """One row of ``describe``: an adapted layer's shape, rank and parameters."""

    name: str
    kind: str
    d_in: int
    d_out: int
    n: int
    r: int
    equivalent_rank: int
    trainable_params: int


SAVED_PREFIX = "modules_to_save."


# ---- methods -----------------------------------------------------------------


class AdapterMethod:
    """A method's behaviour: builds its layers and holds the trainer's hooks.

    A trainer drives every method the same way::

        method = get_method(config, seed)
        for step, batch in enumerate(loader):
            method.on_step_begin(model, step)          # DyLoRA: sample this step's rank
            loss = model(**batch).loss; loss.backward()
            method.before_optimizer_step(model, step)  # Delta-LoRA: remember (A_t, B_t)
            optimizer.step()
            method.on_step_end(model, step)            # AdaLoRA: reallocate; Delta-LoRA: move W
            optimizer.zero_grad()

    ``step`` counts optimiser steps from 0. Hooks a method does not need do
    nothing, so LoRA/MELoRA runs pay nothing for them.

    Subclasses set ``config_class`` and implement ``make_layer``; the other
    methods have defaults for layers that are ``AdapterLayer`` wrappers.
    """

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig

    def __init__(self, config: AdapterConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed

    def make_layer(self, base_layer: nn.Module, name: str) -> AdapterLayer:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- training hooks
    def on_step_begin(self, model: nn.Module, step: int) -> None:
        """Before the forward pass of optimiser step ``step``."""

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """After ``backward()``, before ``optimizer.step()``."""

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """After ``optimizer.step()``, before ``optimizer.zero_grad()``."""

    # -- model surgery
    def inject(self, model: nn.Module, targets: list[str], saved: list[str]) -> nn.Module:
        """Wrap each target in ``make_layer``; train adapters and ``saved`` modules only."""
        for p in model.parameters():
            p.requires_grad_(False)
        for name in targets:
            base = model.get_submodule(name)
            # A new module starts in training mode; follow the model's mode (dropout!).
            set_submodule(model, name, self.make_layer(base, name).train(base.training))
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.requires_grad_(True)
        for name in saved:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        return model

    def merge_and_unload(self, model: nn.Module, safe_merge: bool = False) -> nn.Module:
        """Fold every adapter into its base weight and put the plain layers back."""
        for name, layer in adapter_layers(model).items():
            layer.merge(safe_merge=safe_merge)
            set_submodule(model, name, layer.base_layer)
        return model

    def base_model(self, model: nn.Module) -> nn.Module:
        """The transformers model the adapters sit in (PEFT-injected methods unwrap)."""
        return model

    # -- describing and saving
    def layer_summary(self, name: str, module: nn.Module) -> LayerSummary | None:
        """``describe``'s row for ``module``, or ``None`` if it is not an adapter layer."""
        if not is_adapter_layer(module):
            return None
        params = sum(p.numel() for p in module.adapter_parameters().values())
        return LayerSummary(name, type(module).__name__, module.d_in, module.d_out, module.n, module.r, module.equivalent_rank, params)

    def layer_tensors(self, name: str, layer: AdapterLayer) -> dict[str, torch.Tensor]:
        """The tensors one adapted layer saves, keyed ``"<layer>.<tensor>"``."""
        return {f"{name}.{pname}": p for pname, p in layer.adapter_parameters().items()}

    def state_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor the adapter consists of, keyed as in ``adapter_model.safetensors``."""
        tensors = {}
        for name, layer in adapter_layers(model).items():
            if layer.merged:
                raise ValueError(f"layer '{name}' is merged; unmerge() before saving the adapter")
            tensors.update(self.layer_tensors(name, layer))
        for module_name in find_modules_to_save(model, self.config):
            for pname, p in model.get_submodule(module_name).named_parameters():
                tensors[f"{SAVED_PREFIX}{module_name}.{pname}"] = p
        return tensors

    def lora_factors(self, layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A (R, d_in), B (d_out, R), s)`` with ``ΔW = s·B·A``, if the layer is exactly a LoRA.

        ``export_peft_lora`` writes these; ``None`` (the default) means the
        method's update is not a plain LoRA and cannot be exported as one.
        """
        return None


METHODS: dict[str, type[AdapterMethod]] = {}


def register(method_class: type[AdapterMethod]) -> type[AdapterMethod]:
    """Class decorator: make a method known by its config's ``method`` name.

    Raises:
        ValueError: another class already holds that name.
    """
    name = method_class.config_class.method
    held = METHODS.get(name)
    if held is not None and held is not method_class:
        raise ValueError(f"method {name!r} is already registered by {held.__qualname__}; choose another config.method")
    METHODS[name] = method_class
    return method_class


def config_class(name: str) -> type[AdapterConfig]:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[name].config_class


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from ``to_dict()`` output (or a Hydra ``method`` node)."""
    d = dict(d)
    method = d.pop("method", None)
    if method is None and str(d.get("peft_type", "")).upper() == "MELORA":  # PEFT's adapter_config.json of a MELoRA adapter
        method = "melora"
    cls = config_class(method)
    if not hasattr(cls, "peft_type"):
        for key in _peft_bookkeeping():
            d.pop(key, None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(names)}")
    return cls(**d)


def get_method(config: AdapterConfig, seed: int = 0) -> AdapterMethod:
    """The method object (layer factory + training hooks) for ``config``.

    Args:
        seed: Seeds a method's own random draws (DyLoRA's per-step ranks).
    """
    cls = METHODS.get(config.method)
    if cls is None or not isinstance(config, cls.config_class):
        raise TypeError(f"no adapter method registered for {type(config).__name__}; decorate its AdapterMethod with @register")
    return cls(config, seed=seed)
