"""Adapters on disk: ours (safetensors + JSON) and PEFT's LoRA format.

``save_adapter`` writes two files::

    adapter_config.json        method, hyper-parameters, base model, target layers and shapes
    adapter_model.safetensors  "<layer>.lora_A", "<layer>.lora_B", ..., "modules_to_save.<module>.<param>"

Delta-LoRA also stores each target's moved base weight ("<layer>.base_layer.weight"),
since its training changes ``W`` itself. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from melora.adapters.base import adapter_layers, config_from_dict, find_modules_to_save, is_adaptable, linear_dims
from melora.adapters.inject import CONFIG_ATTR, get_config, inject, layer_summaries, method_of, unwrap_base_model
from melora.files import atomic_save_tensors, atomic_write_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1


def base_model_name(model: nn.Module) -> str | None:
    config = getattr(unwrap_base_model(model), "config", None)
    return getattr(config, "_name_or_path", None) or None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor an adapter consists of, keyed as in ``adapter_model.safetensors``."""
    return method_of(model).state_tensors(model)


def _target_layers(model: nn.Module) -> list[dict]:
    return [{"name": s.name, "d_in": s.d_in, "d_out": s.d_out} for s in layer_summaries(model)]


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = get_config(model)
    tensors = adapter_state_dict(model)
    meta = {
        "format": "melora-adapter",
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "config": config.as_record(),
        "base_model": base_model_name(model),
        "target_layers": _target_layers(model),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    atomic_save_tensors(tensors, directory / WEIGHTS_FILE)
    atomic_write_json(directory / CONFIG_FILE, meta)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is '{directory}' a folder written by melora.save_adapter?")
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:  # truncated, corrupt or not UTF-8
        raise ValueError(f"{path} is damaged ({err}); the adapter cannot be read: save or train it again, or restore the file") from err
    if not isinstance(meta, dict) or meta.get("format") != "melora-adapter":
        raise ValueError(f"{path} is not a melora adapter config (a PEFT adapter? load it with peft.PeftModel)")
    return meta


def load_adapter(base_model: nn.Module, directory: str | os.PathLike, strict_base_model: bool = False) -> nn.Module:
    """Inject the saved adapter's config into ``base_model`` and load its weights.

    Args:
        base_model: A fresh model of the architecture the adapter was trained on.
        directory: A folder written by ``save_adapter``.
        strict_base_model: Also require the recorded base-model name to match.

    Raises:
        ValueError: the base model lacks a recorded layer, a shape differs, or
            (with ``strict_base_model``) the base-model name differs.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    config = config_from_dict(meta["config"])
    recorded, actual = meta.get("base_model"), base_model_name(base_model)
    if strict_base_model and recorded != actual:
        raise ValueError(f"adapter in {directory} was trained on base model '{recorded}', got '{actual}'")
    hint = f"the adapter was trained on '{recorded}'" + (f", this model is '{actual}'" if actual else "")
    modules = dict(base_model.named_modules())
    for layer in meta["target_layers"]:
        module = modules.get(layer["name"])
        if module is None:
            raise ValueError(f"base model has no layer '{layer['name']}' recorded in {directory}: {hint}")
        dims = linear_dims(module) if is_adaptable(module) else None
        if dims != (layer["d_in"], layer["d_out"]):
            raise ValueError(
                f"layer '{layer['name']}' has (d_in, d_out)={dims}, the adapter expects "
                f"({layer['d_in']}, {layer['d_out']}): {hint}"
            )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the adapter in {directory} is incomplete; save or train it again")
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors' own error types: a truncated file, a damaged header
        raise ValueError(f"{weights} is damaged ({err}); the adapter cannot be loaded: save or train it again, or restore the file") from err
    model = inject(base_model, config)
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter tensors do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}: {hint}")
    with torch.no_grad():
        for key, target in own.items():
            source = tensors[key]
            if source.shape != target.shape:
                raise ValueError(f"tensor '{key}' has shape {tuple(source.shape)}, the model expects {tuple(target.shape)}: {hint}")
            target.copy_(source)
    return model


def export_peft_lora(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a MELoRA (or LoRA) adapter as a standard PEFT LoRA adapter folder.

    ``ΔW = s·blockdiag(B_i)·blockdiag(A_i)`` is a LoRA of rank ``R = n·r`` whose
    factors are the block-diagonal matrices, zero off the diagonal:
    ``lora_A.weight = blockdiag(A_i)`` ``(R, d_in)``,
    ``lora_B.weight = blockdiag(B_i)`` ``(d_out, R)``, and ``lora_alpha = s·R``
    so that PEFT's ``lora_alpha / r`` equals ``s``. ``peft.PeftModel.from_pretrained``
    then reproduces the model's outputs, and any LoRA serving stack can serve it.

    A PEFT model with a MELoRA adapter (``get_peft_model(model, MELoRAConfig(...))``) is
    exported the same way, its active adapter (``melora.adapters.peft_melora.export_lora``).
    """
    if hasattr(model, "peft_config") and getattr(model, CONFIG_ATTR, None) is None:
        from melora.adapters.peft_melora import export_lora

        return export_lora(model, directory, adapter_name=model.active_adapter)
    config = get_config(model)
    method = method_of(model)
    layers = adapter_layers(model)
    factors = {name: method.lora_factors(layer) for name, layer in layers.items()}
    if not factors or any(f is None for f in factors.values()):
        raise ValueError(f"export_peft_lora needs an update that is exactly a LoRA (e.g. methods 'melora', 'lora'), not '{config.method}'")
    ranks = {A.shape[0] for A, _, _ in factors.values()}
    scales = {s for _, _, s in factors.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"layers disagree on rank {ranks} or scaling {scales}; PEFT needs one of each")
    rank, scale = ranks.pop(), scales.pop()
    fan_in_fan_out = {layer.fan_in_fan_out for layer in layers.values()}
    tensors = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"layer '{name}' is merged; unmerge() before exporting")
        A, B, _ = factors[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    saved = find_modules_to_save(model, config)
    for module_name in saved:
        for pname, p in model.get_submodule(module_name).named_parameters():
            tensors[f"base_model.model.{module_name}.{pname}"] = p.detach()
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name(model),
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": getattr(config, "dropout", 0.0),
        "target_modules": sorted(layers),
        "modules_to_save": saved or None,
        "fan_in_fan_out": fan_in_fan_out == {True},
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, directory / WEIGHTS_FILE)
    atomic_write_json(directory / "adapter_config.json", peft_config)
    return directory
