"""Spectra of the learned updates ``ΔW`` (the paper's Figure 3 statistic).

The paper estimates the rank an adapter actually learned by counting the
singular values of ``ΔW`` above 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from melora.adapters.base import AdapterLayer


@dataclass
class LayerSpectrum:
    """Singular values of one layer's ``ΔW``, largest first (float64)."""

    name: str
    singular_values: torch.Tensor
    threshold: float
    count_above: int
    nominal_rank: int | None


def _updates(model: nn.Module, adapter: str | None):
    """``(layer path, ΔW in float64, nominal rank)`` of every adapted layer (``melora.inject`` or a PEFT MELoRA model)."""
    from melora.adapters.melora import MELoRALayer, delta_weight

    for name, module in model.named_modules():
        if isinstance(module, MELoRALayer):
            chosen = adapter or module.active_adapters[0]
            if chosen in module.melora_A:
                delta = delta_weight(module.melora_A[chosen], module.melora_B[chosen], module.melora_scaling[chosen], torch.float64)
                yield name, delta, module.melora_n[chosen] * module.melora_r[chosen]
        elif isinstance(module, AdapterLayer):
            yield name, module.delta_weight(torch.float64), getattr(module, "equivalent_rank", getattr(module, "r", None))


def singular_values(model: nn.Module, threshold: float = 0.1, adapter: str | None = None) -> dict[str, LayerSpectrum]:
    """fp64 SVD of every adapted layer's ``ΔW`` (scaling included).

    Args:
        model: A model with adapters (``melora.inject`` / ``load_adapter``, or a PEFT model with MELoRA adapters).
        threshold: Singular values strictly above it are counted (paper: 0.1).
        adapter: A PEFT model's adapter to analyse; ``None``: the active one.

    Returns:
        Layer path → ``LayerSpectrum``; ``count_above`` is the Figure 3 count.
    """
    spectra = {}
    with torch.no_grad():
        for name, delta, nominal_rank in _updates(model, adapter):
            s = torch.linalg.svdvals(delta.cpu())
            spectra[name] = LayerSpectrum(name=name, singular_values=s, threshold=threshold,
                                          count_above=int((s > threshold).sum()), nominal_rank=nominal_rank)
    if not spectra:
        raise ValueError("model has no adapter layers: inject or load an adapter first")
    return spectra


def count_above(spectra: dict[str, LayerSpectrum], thresholds: list[float]) -> dict[str, dict[float, int]]:
    """Per layer, the number of singular values above each threshold."""
    return {name: {t: int((sp.singular_values > t).sum()) for t in thresholds} for name, sp in spectra.items()}
