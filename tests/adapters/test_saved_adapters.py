"""Adapters saved by an earlier layout of the library still load and give the same outputs."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert

import melora

SAVED = Path(__file__).resolve().parents[1] / "fixtures" / "saved_adapters"


@pytest.mark.parametrize("method", ["melora", "lora", "dylora", "delta_lora", "adalora"])
def test_adapter_saved_before_the_redesign_loads_and_reproduces_logits(method):
    folder = SAVED / method
    expected = json.loads((folder / "expected_logits.json").read_text())
    model = melora.load_adapter(tiny_bert(), folder).eval()
    assert melora.get_config(model).method == method
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(expected["input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-6)
    base = tiny_bert().eval()
    with torch.no_grad():
        moved = (base(input_ids=torch.tensor(expected["input_ids"])).logits - logits).abs().max()
    assert moved > 1e-5  # the comparison above would catch an adapter that failed to load
