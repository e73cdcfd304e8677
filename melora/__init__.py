"""MELoRA: Mini-Ensemble Low-Rank Adapters (Ren et al., ACL 2024, arXiv 2402.17263).

Three lines put MELoRA into a Hugging Face model::

    import melora
    model = melora.inject(model, melora.MELoRAConfig(n=8, r=1, target_modules=["query", "value"]))
    print(melora.describe(model))
"""

from melora.adapters import (
    AdaLoRAConfig,
    AdapterConfig,
    AdapterLayer,
    AdapterMethod,
    DeltaLoRAConfig,
    DeltaLoRALinear,
    DyLoRAConfig,
    DyLoRALinear,
    LoRAConfig,
    MELoRAConfig,
    MELoRALinear,
    adapter_layers,
    config_from_dict,
    describe,
    export_peft_lora,
    get_config,
    get_method,
    inject,
    load_adapter,
    merge_and_unload,
    read_adapter_config,
    save_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterMethod",
    "DeltaLoRAConfig",
    "DeltaLoRALinear",
    "DyLoRAConfig",
    "DyLoRALinear",
    "LoRAConfig",
    "MELoRAConfig",
    "MELoRALinear",
    "adapter_layers",
    "config_from_dict",
    "describe",
    "export_peft_lora",
    "get_config",
    "get_method",
    "inject",
    "load_adapter",
    "merge_and_unload",
    "read_adapter_config",
    "save_adapter",
]
