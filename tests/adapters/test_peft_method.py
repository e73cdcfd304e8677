"""MELoRA as a PEFT method: get_peft_model, several adapters, merge, save/load (also in a fresh process), LoRA equality."""

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.utils import PeftType

import melora
from melora.adapters import peft_melora
from melora.adapters.melora import reference_forward


def melora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, peft_melora.Linear)}


def randomize(model, adapter="default", seed=1, scale=0.1):
    """B = 0 at init would make every equality trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in melora_layers(model).values():
            if adapter in layer.melora_B:
                layer.melora_B[adapter].copy_(torch.randn(layer.melora_B[adapter].shape, generator=g) * scale)


def ids(batch=2, length=7, vocab=120, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_melora_is_a_registered_peft_method_and_registration_is_idempotent():
    assert PeftType.MELORA == "MELORA" and PeftType("MELORA") is PeftType.MELORA
    assert peft_melora.register() is True  # a second call changes nothing
    config = melora.MELoRAConfig(n=4, r=2)
    assert config.peft_type == "MELORA" and isinstance(config, PeftConfig)
    assert melora.config_from_dict(config.to_dict()) == config == melora.config_from_dict(config.as_record())
    assert "peft_type" not in config.as_record() and config.as_record()["method"] == "melora"


def test_a_foreign_melora_in_peft_makes_registration_step_aside(monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    class PeftsOwnMELoRA:  # what a future peft release might ship
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, PeftType.MELORA, PeftsOwnMELoRA)
    with pytest.warns(UserWarning, match="has its own MELORA method"):
        assert peft_melora.register() is False


def test_peft_layer_equals_the_definition_and_the_inject_layer():
    """Same factors: PEFT's layer, melora.inject's MELoRALinear and the float64 reference agree."""
    base = tiny_bert()
    config = melora.MELoRAConfig(n=4, r=2, dropout=0.0, target_modules=["query", "value"])
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    randomize(peft_model)
    injected = melora.inject(copy.deepcopy(base), melora.MELoRAConfig(n=4, r=2, dropout=0.0, target_modules=["query", "value"])).eval()
    legacy = melora.adapter_layers(injected)
    for name, layer in melora_layers(peft_model).items():
        twin = legacy[name.removeprefix("base_model.model.")]
        with torch.no_grad():
            twin.lora_A.copy_(layer.melora_A["default"])
            twin.lora_B.copy_(layer.melora_B["default"])
        x = torch.randn(3, 5, layer.in_features, dtype=torch.float64)
        base_layer = layer.get_base_layer()
        expected = reference_forward(x, base_layer.weight.double(), layer.melora_A["default"].double(),
                                     layer.melora_B["default"].double(), layer.melora_scaling["default"]) + base_layer.bias.double()
        assert torch.allclose(layer(x.float()).double(), expected, atol=1e-5)
    x = ids()
    assert torch.allclose(peft_model(input_ids=x).logits, injected(input_ids=x).logits, atol=1e-6)


@pytest.mark.parametrize("factory,targets", [(tiny_bert, ["query", "value"]), (tiny_gpt2, ["c_attn"]), (tiny_llama, ["q_proj", "v_proj"])])
def test_n1_equals_peft_lora_outputs_and_gradients_merged_and_unmerged(factory, targets):
    """LoRA is MELoRA with n = 1: the same weights give PEFT LoRA's outputs and gradients."""
    base = factory()
    fan_in_fan_out = factory is tiny_gpt2
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                          fan_in_fan_out=fan_in_fan_out))
    ours = get_peft_model(copy.deepcopy(base), melora.LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    pairs = []
    for name, layer in melora_layers(ours).items():
        twin = lora.get_submodule(name)
        with torch.no_grad():
            twin.lora_B["default"].weight.copy_(torch.randn(twin.lora_B["default"].weight.shape, generator=g) * 0.1)
            layer.melora_A["default"].copy_(twin.lora_A["default"].weight[None])
            layer.melora_B["default"].copy_(twin.lora_B["default"].weight[None])
        pairs.append((layer, twin))
    x = ids(vocab=100)
    out_lora, out_ours = lora(input_ids=x).logits, ours(input_ids=x).logits
    assert torch.allclose(out_ours, out_lora, atol=1e-5)
    out_lora.square().sum().backward()
    out_ours.square().sum().backward()
    for layer, twin in pairs:
        assert torch.allclose(layer.melora_A["default"].grad[0], twin.lora_A["default"].weight.grad, atol=1e-4, rtol=1e-4)
        assert torch.allclose(layer.melora_B["default"].grad[0], twin.lora_B["default"].weight.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        merged_lora, merged_ours = lora.merge_and_unload(), ours.merge_and_unload()
        assert torch.allclose(merged_ours(input_ids=x).logits, merged_lora(input_ids=x).logits, atol=1e-5)


def test_merge_unmerge_and_unload_keep_the_output():
    model = get_peft_model(tiny_bert(), melora.MELoRAConfig(n=8, r=1, dropout=0.0)).eval()
    randomize(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        model.merge_adapter()
        assert all(layer.merged for layer in melora_layers(model).values())
        assert torch.allclose(model(input_ids=x).logits, expected, atol=1e-5)
        model.unmerge_adapter()
        assert torch.allclose(model(input_ids=x).logits, expected, atol=1e-5)
        plain = model.merge_and_unload(safe_merge=True)
        assert not melora_layers(plain) and torch.allclose(plain(input_ids=x).logits, expected, atol=1e-5)


def test_several_named_adapters_set_disable_delete_and_save(tmp_path):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), melora.MELoRAConfig(n=4, r=2, dropout=0.0)).eval()
    model.add_adapter("second", melora.MELoRAConfig(n=2, r=4, dropout=0.0, target_modules=["value"]))
    randomize(model, "default", seed=1)
    randomize(model, "second", seed=2)
    x = ids()
    with torch.no_grad():
        first = model(input_ids=x).logits
        model.set_adapter("second")
        second = model(input_ids=x).logits
        with model.disable_adapter():
            plain = model(input_ids=x).logits
    assert torch.allclose(plain, base(input_ids=x).logits, atol=1e-6)
    assert not torch.allclose(first, second) and not torch.allclose(first, plain)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable if "melora_" in n)  # only the active adapter trains
    # both adapters active at once: the sum of their updates
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        both = model(input_ids=x).logits
    assert not torch.allclose(both, first) and not torch.allclose(both, second)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "second" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, first, atol=1e-6)
        loaded.set_adapter("second")
        assert torch.allclose(loaded(input_ids=x).logits, second, atol=1e-6)
    loaded.delete_adapter("second")
    assert all("second" not in layer.melora_A for layer in melora_layers(loaded).values())
    assert list(loaded.peft_config) == ["default"]


def test_inject_adapter_in_model_and_peft_state_dicts():
    base = tiny_bert()
    config = melora.MELoRAConfig(n=4, r=2, dropout=0.0)
    source = get_peft_model(copy.deepcopy(base), config).eval()
    randomize(source)
    state = get_peft_model_state_dict(source)
    assert state and all(".melora_A" in k or ".melora_B" in k for k in state)
    target = inject_adapter_in_model(melora.MELoRAConfig(n=4, r=2, dropout=0.0), copy.deepcopy(base)).eval()
    result = set_peft_model_state_dict(target, state)
    assert not [k for k in result.unexpected_keys if "melora_" in k]
    x = ids()
    with torch.no_grad():
        assert torch.allclose(target(input_ids=x).logits, source(input_ids=x).logits, atol=1e-6)


def test_n_that_does_not_divide_a_layer_is_one_clear_error():
    with pytest.raises(ValueError, match="not divisible by n=5"):
        get_peft_model(tiny_bert(), melora.MELoRAConfig(n=5, r=1))


def _save_base_and_adapter(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_bert().save_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)  # PEFT records its name_or_path in the adapter
    model = get_peft_model(base, melora.MELoRAConfig(n=4, r=2, dropout=0.0, task_type="SEQ_CLS")).eval()
    randomize(model)
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        logits = model(input_ids=ids()).logits
    return base_dir, adapter_dir, logits


LOADERS = {
    "PeftModel": "PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), adapter)",
    "AutoPeftModel": "AutoPeftModelForSequenceClassification.from_pretrained(adapter)",
    "transformers": "AutoModelForSequenceClassification.from_pretrained(base); model.load_adapter(adapter)",
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_fresh_process_loads_a_saved_adapter_after_import_melora(tmp_path, loader):
    base_dir, adapter_dir, logits = _save_base_and_adapter(tmp_path)
    expression = LOADERS[loader]
    if loader == "transformers":
        build = f"model = {expression.split(';')[0]}\n{expression.split('; ')[1]}"
    else:
        build = f"model = {expression}"
    code = f"""
import json, torch, melora
from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification
base, adapter = {str(base_dir)!r}, {str(adapter_dir)!r}
assert type(PeftConfig.from_pretrained(adapter)).__name__ == "MELoRAConfig"
{build}
model.eval()
ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    print(json.dumps(model(input_ids=ids).logits.tolist()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert torch.allclose(torch.tensor(json.loads(out.stdout.strip().splitlines()[-1])), logits, atol=1e-6)


def test_the_adapter_config_is_peft_s_format(tmp_path):
    _, adapter_dir, _ = _save_base_and_adapter(tmp_path)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MELORA" and saved["n"] == 4 and saved["r"] == 2 and "method" not in saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword" warning on loading: every key is a field
        assert PeftConfig.from_pretrained(adapter_dir) == melora.MELoRAConfig(**{k: v for k, v in saved.items()})


def test_export_to_plain_peft_lora_for_serving_reproduces_the_outputs(tmp_path):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), melora.MELoRAConfig(n=4, r=2, dropout=0.0, modules_to_save=["classifier"])).eval()
    randomize(model)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)  # a trained head travels too
    melora.export_peft_lora(model, tmp_path)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert isinstance(lora.peft_config["default"], LoraConfig) and lora.peft_config["default"].r == 8
    x = ids()
    with torch.no_grad():
        assert torch.allclose(lora(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


def test_spectra_of_a_peft_model_have_rank_n_times_r():
    model = get_peft_model(tiny_bert(), melora.MELoRAConfig(n=4, r=2, dropout=0.0))
    randomize(model)
    spectra = melora.analysis.singular_values(model)
    assert len(spectra) == 4 and all(sp.nominal_rank == 8 for sp in spectra.values())
    for sp in spectra.values():
        assert int((sp.singular_values > 1e-8).sum()) == 8  # generic factors: the full rank n·r, nothing above it
