"""The adapter library: one file per method, and injection, merging, save/load, export.

Depends only on torch, safetensors, transformers (for ``Conv1D``) and peft (for
AdaLoRA and the PEFT export); nothing here imports the experiment side.

The imports below are the method registry: each method file registers itself
(``@register``) when imported. A new method is one more file and one more line.
"""

from melora.adapters.adalora import AdaLoRAConfig
from melora.adapters.base import (
    AdapterConfig,
    AdapterLayer,
    AdapterMethod,
    adapter_layers,
    config_from_dict,
    find_targets,
    get_method,
    register,
)
from melora.adapters.delta_lora import DeltaLoRAConfig, DeltaLoRALinear
from melora.adapters.dylora import DyLoRAConfig, DyLoRALinear
from melora.adapters.inject import describe, get_config, inject, merge_and_unload
from melora.adapters.io import export_peft_lora, load_adapter, read_adapter_config, save_adapter
from melora.adapters.melora import LoRAConfig, MELoRAConfig, MELoRALayer, MELoRALinear
from melora.adapters.peft_melora import MELoRAModel
from melora.adapters.peft_melora import register as _register_with_peft

_register_with_peft()  # get_peft_model(model, MELoRAConfig(...)) and PEFT's loaders know MELoRA from here on
