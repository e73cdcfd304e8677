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


def singular_values(model: nn.Module, threshold: float = 0.1) -> dict[str, LayerSpectrum]:
    """fp64 SVD of every adapted layer's ``ΔW`` (scaling included).

    Args:
        model: A model with adapters (``melora.inject`` / ``load_adapter``).
        threshold: Singular values strictly above it are counted (paper: 0.1).

    Returns:
        Layer path → ``LayerSpectrum``; ``count_above`` is the Figure 3 count.
    """
    spectra = {}
    for name, module in model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        with torch.no_grad():
            s = torch.linalg.svdvals(module.delta_weight(torch.float64).cpu())
        spectra[name] = LayerSpectrum(
            name=name,
            singular_values=s,
            threshold=threshold,
            count_above=int((s > threshold).sum()),
            nominal_rank=getattr(module, "equivalent_rank", getattr(module, "r", None)),
        )
    if not spectra:
        raise ValueError("model has no adapter layers: inject or load an adapter first")
    return spectra


def count_above(spectra: dict[str, LayerSpectrum], thresholds: list[float]) -> dict[str, dict[float, int]]:
    """Per layer, the number of singular values above each threshold."""
    return {name: {t: int((sp.singular_values > t).sum()) for t in thresholds} for name, sp in spectra.items()}
