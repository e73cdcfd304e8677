"""Adding a method is one file, one YAML and one test: this file is all three.

LoRA-FA (Zhang et al. 2023, arXiv 2308.03303) freezes LoRA's random ``A`` and
trains only ``B``. It is defined here, registered, and then run through the
real pipeline without touching the package: a Hydra run trains it on SST-2,
its adapter is saved and loaded back, and the report tabulates it by its config.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn
from conftest import data_dir, tiny_bert
from hydra import compose, initialize_config_dir

import melora
from melora.adapters.base import METHODS, AdapterConfig, AdapterLayer, AdapterMethod, check_positive_int, register
from melora.experiments.report.paper import glue_column
from melora.experiments.report.records import load_records
from melora.experiments.report.tables import RowSpec, build_rows
from melora.experiments.sweep import CONFIGS

# ---- 1. the method file: config, layer, method --------------------------------------------------


@dataclass
class LoRAFAConfig(AdapterConfig):
    """LoRA-FA: ``ΔW = (alpha / r) · B A`` with ``A (r × d_in)`` frozen at its random init."""

    method: ClassVar[str] = "lora_fa"
    display_name: ClassVar[str] = "LoRA-FA"

    r: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)


class LoRAFALinear(AdapterLayer):
    adapter_param_names = ("lora_B",)

    def __init__(self, base_layer: nn.Module, r: int, alpha: float) -> None:
        super().__init__(base_layer)
        self.r, self.scaling = r, alpha / r
        weight = base_layer.weight
        A = torch.empty(r, self.d_in, dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.register_buffer("lora_A", A)
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, r, dtype=weight.dtype, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling


class LoRAFAMethod(AdapterMethod):
    config_class = LoRAFAConfig

    def make_layer(self, base_layer: nn.Module, name: str) -> LoRAFALinear:
        return LoRAFALinear(base_layer, self.config.r, self.config.alpha)

    def layer_tensors(self, name: str, layer: LoRAFALinear) -> dict[str, torch.Tensor]:
        # The frozen A is part of the adapter: without it, B means nothing.
        return {**super().layer_tensors(name, layer), f"{name}.lora_A": layer.lora_A}


@pytest.fixture(autouse=True)
def registered():
    """``@register`` at import time in a real method file; undone here so other tests see the usual registry."""
    register(LoRAFAMethod)
    yield
    del METHODS["lora_fa"]


# ---- 2. its YAML ----------------------------------------------------------------------------------

METHOD_YAML = """\
name: lora_fa
tag: lora_fa_r${method.r}
r: 4
alpha: 16
target_modules: ${model.target_modules}
modules_to_save: ${model.modules_to_save}
"""

# ---- 3. its test ----------------------------------------------------------------------------------


def test_the_library_treats_it_like_any_method(tmp_path):
    model = melora.inject(tiny_bert(), LoRAFAConfig(r=4, target_modules=["query", "value"]))
    summary = melora.describe(model)
    assert summary.method == "lora_fa" and summary.adapter_params == 4 * 64 * 4  # 4 layers × B (64 × 4)
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n] == []
    with torch.no_grad():
        for layer in melora.adapter_layers(model).values():
            layer.lora_B.normal_()
    ids = torch.randint(0, 100, (2, 7))
    expected = model(input_ids=ids).logits
    loaded = melora.load_adapter(tiny_bert(), melora.save_adapter(model, tmp_path / "adapter"))
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    merged = melora.merge_and_unload(loaded)
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_it_trains_saves_loads_and_tabulates_through_the_pipeline(tmp_path):
    from melora.experiments.glue import train_glue
    from melora.experiments.models import load_sequence_classifier

    data_dir()
    (tmp_path / "configs" / "method").mkdir(parents=True)
    (tmp_path / "configs" / "method" / "lora_fa.yaml").write_text(METHOD_YAML)
    runs = tmp_path / "runs"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "profile=smoke",
                                           "task=glue/sst2", "method=lora_fa", "task.epochs=2", "task.lr=3e-3",
                                           f"run_dir={runs / 'smoke' / 'lora_fa_r4'}"])
    record = train_glue(cfg)
    assert record["status"] == "completed" and record["method_config"]["method"] == "lora_fa"
    assert record["adapter_params"] == 12 * 384 * 4  # B only, in the 6 layers' query and value of MiniLM

    base = load_sequence_classifier(cfg.model, 2, "single_label_classification")
    model = melora.load_adapter(base, f"{cfg.run_dir}/adapter").eval()
    assert isinstance(melora.get_config(model), LoRAFAConfig)
    assert any(isinstance(m, LoRAFALinear) for m in model.modules())

    records = load_records(runs)
    rows, excluded, _ = build_rows(records, [RowSpec("LoRA-FA r=4", ("LoRA-FA r=4",))], [glue_column("sst2")])
    assert excluded == [] and rows[0].cells["sst2"].values == [record["best_metric"]]
