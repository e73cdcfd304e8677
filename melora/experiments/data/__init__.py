"""Datasets for the MELoRA experiments: GLUE (NLU) and Alpaca (instruction tuning).

Submodules:

* :mod:`melora.experiments.data.glue_tasks` - the GLUE task registry (no heavy imports);
* :mod:`melora.experiments.data.glue` - ``load_glue``, ``subsample``, ``tokenize_glue``;
* :mod:`melora.experiments.data.alpaca` - ``load_alpaca``, ``train_dev_split``,
  ``build_prompt``, ``tokenize_alpaca``, ``CausalLMCollator``;
* :mod:`melora.experiments.data.errors` - ``DataFormatError``.

The names below are importable from ``melora.experiments.data`` directly; they are loaded
on first use so that importing the package does not import ``datasets``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataFormatError": "melora.experiments.data.errors",
    "DATA_DIR_ENV": "melora.experiments.data.paths",
    "resolve_data_dir": "melora.experiments.data.paths",
    "GLUE_TASKS": "melora.experiments.data.glue_tasks",
    "GlueTask": "melora.experiments.data.glue_tasks",
    "get_task": "melora.experiments.data.glue_tasks",
    "main_metric": "melora.experiments.data.glue_tasks",
    "glue_features": "melora.experiments.data.glue",
    "load_glue": "melora.experiments.data.glue",
    "subsample": "melora.experiments.data.glue",
    "tokenize_glue": "melora.experiments.data.glue",
    "glue_collator": "melora.experiments.data.glue",
    "load_alpaca": "melora.experiments.data.alpaca",
    "train_dev_split": "melora.experiments.data.alpaca",
    "build_prompt": "melora.experiments.data.alpaca",
    "tokenize_alpaca": "melora.experiments.data.alpaca",
    "CausalLMCollator": "melora.experiments.data.alpaca",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name from its submodule on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the lazily exported names too."""
    return sorted(set(globals()) | set(_EXPORTS))
