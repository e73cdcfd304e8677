"""MELoRA: Mini-Ensemble Low-Rank Adapters (Ren et al., ACL 2024, arXiv 2402.17263).

Three lines put MELoRA into a Hugging Face model through PEFT::

    import melora                      # registers MELoRA with PEFT
    from peft import get_peft_model
    model = get_peft_model(model, melora.MELoRAConfig(n=8, r=1, target_modules=["query", "value"]))

``melora.inject`` (the single-adapter path of the paper's experiments), ``save_adapter``,
``load_adapter``, ``export_peft_lora`` and ``melora.analysis`` (spectra of ``ΔW``) work as well.
"""

import logging as _logging

# bitsandbytes, which PEFT imports when it is installed, warns at import that it could not fetch an
# optional CPU kernel from the hub (always, offline); its built-in kernel is used instead.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

from melora import analysis
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
    MELoRALayer,
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
    "MELoRALayer",
    "MELoRALinear",
    "adapter_layers",
    "analysis",
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
