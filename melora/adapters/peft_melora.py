"""MELoRA as a PEFT method: ``peft.get_peft_model(model, melora.MELoRAConfig(...))`` after ``import melora``.

PEFT's generic tuner machinery (``BaseTuner`` / ``BaseTunerLayer``) does the
target matching, trainable-parameter marking, several named adapters,
enable/disable, merge/unmerge/unload and saving; this module adds MELoRA's
tuner to it. The tuner layer is :class:`melora.adapters.melora.Linear`, the
same layer ``melora.inject`` puts into a model (with one adapter).

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

import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from melora.adapters import formulations
from melora.adapters.melora import PEFT_TYPE, Linear, MELoRAConfig, MELoRALayer, linear_dims

log = logging.getLogger(__name__)
PEFT_NAME = PEFT_TYPE.lower()  # "melora": PEFT's method name; its parameters are prefixed "melora_"
PREFIX = f"{PEFT_NAME}_"


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
        linear_dims(base)  # a clear TypeError for a layer that is not linear
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
    ranks = {m.melora_n[adapter_name] * m.melora_r[adapter_name] for m in layers.values()}
    scales = {m.melora_scaling[adapter_name] for m in layers.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"layers disagree on rank {ranks} or scaling {scales}; a PEFT LoRA config holds one of each")
    rank, scale = ranks.pop(), scales.pop()
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {k: v.detach() for k, v in state.items() if ".melora_A" not in k and ".melora_B" not in k}
    for key, value in state.items():
        for packed, lora in ((".melora_A", ".lora_A.weight"), (".melora_B", ".lora_B.weight")):
            if key.endswith(packed):
                tensors[key.removesuffix(packed) + lora] = formulations.block_diagonal(value.detach())
    conv1d = {m.fan_in_fan_out for m in layers.values()}
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
