"""Paper-scale parameter counts from model configs alone (meta device, no weights)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, RobertaConfig, RobertaModel

import melora


def roberta_base():
    with torch.device("meta"):
        return RobertaModel(RobertaConfig(), add_pooling_layer=False)  # RobertaConfig() is roberta-base's shape


def llama2_7b():
    cfg = LlamaConfig(  # meta-llama/Llama-2-7b-hf's config.json
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def adapter_params(model, cfg):
    return melora.describe(melora.inject(model, cfg)).adapter_params


def test_roberta_base_lora_r8():
    # 12 layers × 2 projections × (768 + 768) × 8
    assert adapter_params(roberta_base(), melora.LoRAConfig(r=8)) == 294_912


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_roberta_base_melora_r1_any_n(n):
    # (768 + 768) × 1 per layer, × 24 layers, for any n
    assert adapter_params(roberta_base(), melora.MELoRAConfig(n=n, r=1)) == 36_864


@pytest.mark.parametrize("n", [8, 16, 32, 64])
def test_llama2_7b_melora_r1(n):
    # 32 layers × 2 projections × (4096 + 4096) × 1 = 524,288
    assert adapter_params(llama2_7b(), melora.MELoRAConfig(n=n, r=1, target_modules=["q_proj", "v_proj"])) == 524_288


def test_llama2_7b_lora_ratio():
    lora = adapter_params(llama2_7b(), melora.LoRAConfig(r=64, target_modules=["q_proj", "v_proj"]))
    assert lora == 32 * 2 * 8192 * 64 == 33_554_432
    # LoRA r=64 vs MELoRA r=1 (any n): 64× fewer parameters
    assert lora // 524_288 == 64
