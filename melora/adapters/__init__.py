"""The adapter library: layers, configs, injection, merging, save/load, export.

Depends only on torch, safetensors, transformers (for ``Conv1D``) and peft (for
AdaLoRA and the PEFT export); nothing here imports the experiment side.
"""

from melora.adapters.baselines import DeltaLoRALinear, DyLoRALinear
from melora.adapters.config import (
    AdaLoRAConfig,
    AdapterConfig,
    DeltaLoRAConfig,
    DyLoRAConfig,
    LoRAConfig,
    MELoRAConfig,
    config_from_dict,
)
from melora.adapters.inject import describe, find_targets, get_config, inject, merge_and_unload
from melora.adapters.io import export_peft_lora, load_adapter, read_adapter_config, save_adapter
from melora.adapters.layer import AdapterLayer, MELoRALinear
from melora.adapters.methods import AdapterMethod, adapter_layers, get_method
