"""Singular-value analysis of ΔW (Figure 3 statistic)."""

import pytest
import torch
from conftest import randomize_adapters, tiny_bert

import melora
from melora.analysis import count_above, singular_values


def test_singular_values_match_dense_svd_and_count():
    model = melora.inject(tiny_bert(), melora.MELoRAConfig(n=4, r=2))
    randomize_adapters(model)
    spectra = singular_values(model, threshold=0.1)
    assert len(spectra) == 4
    for name, sp in spectra.items():
        layer = model.get_submodule(name)
        reference = torch.linalg.svdvals(layer.delta_weight(torch.float64))
        assert sp.singular_values.dtype == torch.float64
        torch.testing.assert_close(sp.singular_values, reference)
        assert sp.count_above == int((reference > 0.1).sum())
        assert int((sp.singular_values > 1e-9).sum()) == 8 == sp.nominal_rank  # rank n·r


def test_known_spectrum():
    model = melora.inject(tiny_bert(), melora.MELoRAConfig(n=2, r=1, alpha=1))  # s = 1
    layer = next(iter(melora.adapter_layers(model).values()))
    with torch.no_grad():
        for layer in melora.adapter_layers(model).values():
            layer.lora_A.zero_(); layer.lora_B.zero_()
            layer.lora_A[0, 0, 0] = 1.0; layer.lora_B[0, 0, 0] = 0.5   # block 1: singular value 0.5
            layer.lora_A[1, 0, 0] = 1.0; layer.lora_B[1, 0, 0] = 0.05  # block 2: 0.05, below 0.1
    spectra = singular_values(model)
    sp = next(iter(spectra.values()))
    torch.testing.assert_close(sp.singular_values[:3], torch.tensor([0.5, 0.05, 0.0], dtype=torch.float64))
    assert sp.count_above == 1
    assert count_above(spectra, [0.01, 0.1, 1.0])[sp.name] == {0.01: 2, 0.1: 1, 1.0: 0}


def test_no_adapters_error():
    with pytest.raises(ValueError, match="no adapter layers"):
        singular_values(tiny_bert())
