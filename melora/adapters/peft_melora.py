"""MELoRA as a PEFT method: ``peft.get_peft_model(model, melora.MELoRAConfig(...))`` after ``import melora``.

PEFT's generic tuner machinery (``BaseTuner`` / ``BaseTunerLayer``) does the
target matching, trainable-parameter marking, several named adapters,
enable/disable, merge/unmerge/unload and saving; this module adds MELoRA's
layer to it. The layer's math is :mod:`melora.adapters.melora`'s
(``init_factors``, ``delta_weight``) and :func:`melora.adapters.formulations.forward`,
the same calls :class:`~melora.adapters.melora.MELoRALinear` makes.

``import melora`` registers the method (:func:`register`): PEFT's closed
``PeftType`` enum gets a ``MELORA`` member and PEFT's mappings the config and
tuner classes, so ``PeftModel.from_pretrained``, ``AutoPeftModelFor…`` and
transformers' ``model.load_adapter`` read a saved MELoRA adapter. Parameter
names: ``<layer>.melora_A.<adapter>`` ``(n, r, d_in/n)`` and
``<layer>.melora_B.<adapter>`` ``(n, d_out/n, r)``.

Base layers: ``nn.Linear``, transformers ``Conv1D``, and bitsandbytes'
``Linear4bit`` / ``Linear8bitLt`` (QLoRA-style training of the adapter on a
quantized base; merging into a quantized weight is refused with a message).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge

from melora.adapters import formulations
from melora.adapters.base import Conv1D
from melora.adapters.melora import PEFT_TYPE, MELoRAConfig, check_divides, delta_weight, init_factors, scaling_factor

log = logging.getLogger(__name__)
PEFT_NAME = PEFT_TYPE.lower()  # "melora": PEFT's method name; its parameters are prefixed "melora_"
PREFIX = f"{PEFT_NAME}_"


def _quantized(layer: nn.Module) -> str | None:
    """``"4-bit"`` / ``"8-bit"`` for a bitsandbytes layer, else ``None``."""
    kind = type(layer).__name__
    return {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}.get(kind) if type(layer).__module__.startswith("bitsandbytes") else None


def _dims(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear base layer (``nn.Linear``, ``Conv1D``, bitsandbytes)."""
    if Conv1D and isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, nn.Linear) or _quantized(layer):
        return layer.in_features, layer.out_features
    raise TypeError(
        f"MELoRA adapts linear layers (nn.Linear, transformers Conv1D, bitsandbytes Linear4bit/Linear8bitLt), "
        f"got {type(layer).__name__}; name the linear layers in target_modules"
    )


class MELoRALayer(BaseTunerLayer):
    """What a layer with MELoRA adapters holds, per adapter name: the packed factors, ``n``, ``r``, ``s``, dropout.

    Shapes: ``melora_A[name]`` ``(n, r, d_in/n)``; ``melora_B[name]`` ``(n, d_out/n, r)``.
    ``path``: the formulation of a single active adapter (``"auto"`` or one of
    :data:`melora.adapters.formulations.PATHS`).
    """

    adapter_layer_names = ("melora_A", "melora_B")
    other_param_names = ("n", "r", "scaling", "melora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.n: dict[str, int] = {}
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.melora_dropout = nn.ModuleDict({})
        self.melora_A = nn.ParameterDict({})
        self.melora_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.path = "auto"
        self.kwargs = kwargs
        self.in_features, self.out_features = _dims(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: MELoRAConfig, name: str = "") -> None:
        """Add adapter ``adapter_name`` with ``config``'s ``n``, ``r``, scaling, dropout and initialisation."""
        n, r = config.n, config.r
        check_divides(n, self.in_features, self.out_features, name)
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32  # a quantized base stores integers
        self.n[adapter_name], self.r[adapter_name] = n, r
        self.scaling[adapter_name] = scaling_factor(config.alpha, n, r, config.scaling)
        self.melora_A[adapter_name] = nn.Parameter(torch.empty(n, r, self.in_features // n, dtype=dtype))
        self.melora_B[adapter_name] = nn.Parameter(torch.empty(n, self.out_features // n, r, dtype=dtype))
        self.melora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        init_factors(self.melora_A[adapter_name], self.melora_B[adapter_name], config.init)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` of ``adapter`` in the base weight's layout (``(d_out, d_in)``; transposed for ``Conv1D``)."""
        delta = delta_weight(self.melora_A[adapter], self.melora_B[adapter], self.scaling[adapter])
        return delta.T if Conv1D and isinstance(self.get_base_layer(), Conv1D) else delta


class Linear(nn.Module, MELoRALayer):
    """A frozen linear layer with one or more named MELoRA adapters (PEFT's tuner layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MELoRAConfig, name: str = "", **kwargs: Any) -> None:
        super().__init__()
        MELoRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, name)

    def _check_mergeable(self) -> None:
        kind = _quantized(self.get_base_layer())
        if kind:
            raise ValueError(
                f"merging MELoRA into a {kind} quantized base weight is not supported: load the base model without "
                "quantization (e.g. in bf16), load the adapter onto it, then merge; or serve the adapter unmerged"
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' ``ΔW`` into the base weight.

        Args:
            safe_merge: Compute the merged weight out of place and refuse (``ValueError``)
                if it holds NaN or Inf, leaving the base weight untouched.
            adapter_names: Adapters to merge; ``None``: the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._check_mergeable()
        weight = self.get_base_layer().weight
        for adapter in adapter_names:
            if adapter not in self.melora_A:
                continue
            delta = self.get_delta_weight(adapter).detach().to(weight.dtype)
            with torch.no_grad():
                if safe_merge:
                    merged = weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"refusing to merge adapter '{adapter}': W + ΔW holds NaN/Inf; the adapter weights are broken")
                    weight.data.copy_(merged)
                else:
                    weight.data.add_(delta)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.melora_A:
                with torch.no_grad():
                    weight.data.sub_(self.get_delta_weight(adapter).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + Σ_active s · blockdiag(B) · blockdiag(A) · dropout(x)``; ``x`` ``(..., d_in)`` → ``(..., d_out)``."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.melora_A]
        quantized = _quantized(self.get_base_layer())
        if len(active) == 1 and not args and not kwargs and not quantized:
            a = active[0]
            return formulations.forward(x, self.base_layer, self.melora_A[a], self.melora_B[a], self.scaling[a], self.melora_dropout[a], self.path)
        result = self.base_layer(x, *args, **kwargs)
        if quantized:  # bitsandbytes returns its Function's output as a view: add into a copy
            result = result.clone()
        for a in active:
            path = "dense" if self.n[a] == 1 else "bmm"  # the frozen output exists: add each adapter's product into it
            result = formulations.add_adapter_output(result, self.melora_dropout[a](x), self.melora_A[a], self.melora_B[a], self.scaling[a], path)
        return result

    def __repr__(self) -> str:
        return "melora." + super().__repr__()


class MELoRAModel(BaseTuner):
    """PEFT's tuner for MELoRA: puts :class:`Linear` layers where ``config.target_modules`` match.

    Args:
        model: The model to adapt (a transformers model, typically).
        config: ``{adapter_name: MELoRAConfig}``.
        adapter_name: The first adapter's name (``"default"``).
    """

    prefix: str = PREFIX
    tuner_layer_cls = MELoRALayer
    target_module_mapping: dict[str, list[str]] = {}  # every MELoRAConfig names its target_modules

    def _create_and_replace(self, config: MELoRAConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if isinstance(target, MELoRALayer):
            target.update_layer(adapter_name, config, current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        _dims(base)  # a clear TypeError for a layer that is not linear
        new_module = Linear(target, adapter_name, config, name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a second adapter is not trained until it is set active
        self._replace_module(parent, target_name, new_module, target)


def register() -> bool:
    """Make ``MELORA`` a PEFT method (idempotent); ``import melora`` calls it.

    Returns ``True`` when MELoRA is registered by this package. When the
    installed PEFT already has a ``MELORA`` method of its own, this package's
    stays out of the way with a warning (``melora.inject`` still works) and
    ``False`` is returned.
    """
    from aenum import extend_enum
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    if PEFT_TYPE in PeftType.__members__:
        held = PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType[PEFT_TYPE])
        if held is not None:
            ours = held.__module__ == __name__ and held.__qualname__ == MELoRAModel.__qualname__
            if not ours:
                warnings.warn(
                    f"the installed peft has its own {PEFT_TYPE} method ({held.__module__}.{held.__qualname__}); melora's "
                    "PEFT method is not registered and peft's MELoRAConfig/adapters are peft's. melora.inject, "
                    "save_adapter and load_adapter still work; pin peft to the range in melora's pyproject.toml to "
                    "use melora's PEFT method",
                    stacklevel=2,
                )
            return ours
    else:
        # PeftType is a closed enum (peft issues #2273, #2634): register_peft_method needs the member to exist.
        extend_enum(PeftType, PEFT_TYPE, PEFT_TYPE)
    register_peft_method(name=PEFT_NAME, config_cls=MELoRAConfig, model_cls=MELoRAModel)
    return True


def export_lora(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write the MELoRA adapter ``adapter_name`` of a PEFT model as a standard PEFT LoRA adapter folder (for serving).

    ``ΔW = s·blockdiag(B_i)·blockdiag(A_i)`` is a LoRA of rank ``R = n·r`` whose factors are the
    block-diagonal matrices: ``lora_A.weight = blockdiag(A_i)`` ``(R, d_in)``, ``lora_B.weight =
    blockdiag(B_i)`` ``(d_out, R)``, ``lora_alpha = s·R``. vLLM, TGI or ``PeftModel.from_pretrained``
    with PEFT's own LoRA then reproduce the model's outputs.

    Raises:
        ValueError: no MELoRA layer holds ``adapter_name``, a layer is merged, or layers disagree on rank or scaling.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from melora.files import atomic_save_tensors

    config = model.peft_config[adapter_name]
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MELoRALayer) and adapter_name in m.melora_A}
    if not layers:
        raise ValueError(f"no MELoRA layer holds adapter '{adapter_name}'; adapters: {sorted(model.peft_config)}")
    merged = [name for name, m in layers.items() if adapter_name in m.merged_adapters]
    if merged:
        raise ValueError(f"adapter '{adapter_name}' is merged in {merged[0]}; unmerge_adapter() before exporting")
    ranks = {m.n[adapter_name] * m.r[adapter_name] for m in layers.values()}
    scales = {m.scaling[adapter_name] for m in layers.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"layers disagree on rank {ranks} or scaling {scales}; a PEFT LoRA config holds one of each")
    rank, scale = ranks.pop(), scales.pop()
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {k: v.detach() for k, v in state.items() if ".melora_A" not in k and ".melora_B" not in k}
    for key, value in state.items():
        for packed, lora in ((".melora_A", ".lora_A.weight"), (".melora_B", ".lora_B.weight")):
            if key.endswith(packed):
                tensors[key.removesuffix(packed) + lora] = formulations.block_diagonal(value.detach())
    conv1d = {bool(Conv1D and isinstance(m.get_base_layer(), Conv1D)) for m in layers.values()}
    lora_config = LoraConfig(
        r=rank, lora_alpha=scale * rank, lora_dropout=config.dropout, target_modules=config.target_modules,
        exclude_modules=config.exclude_modules, modules_to_save=config.modules_to_save or None, fan_in_fan_out=conv1d == {True},
        task_type=config.task_type, base_model_name_or_path=config.base_model_name_or_path, inference_mode=True,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(directory)
    atomic_save_tensors(tensors, directory / "adapter_model.safetensors")
    return directory
