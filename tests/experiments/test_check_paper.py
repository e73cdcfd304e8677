"""Paper-shape dry runs: the paper configurations on random-weight roberta-base / LLaMA-2-7B-layer folders.

The runs go through the real entry points (``python -m melora.experiments.glue|instruct|instructeval
profile=paper model=roberta-base|llama2-7b model.source=path model.name_or_path=<folder>``),
cut to two optimiser steps. The folders are cached in ``$MELORA_CACHE/paper-shapes``: the
first session builds them (about 40 s), later ones reuse them.
"""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import data_dir
from safetensors import safe_open
from safetensors.torch import load_file

from melora.experiments.paper_shapes import (
    GLUE_METHODS,
    GLUE_TASKS,
    INSTRUCT_METHODS,
    LLAMA2_7B,
    ROBERTA_BASE,
    STANDIN_FILES,
    Cut,
    check_data_dir,
    glue_combinations,
    instruct_combinations,
    one_line_error,
    paper_shape_folder,
    run_combination,
    shapes_root,
)

ROOT = Path(__file__).resolve().parents[2]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86: AVX512-BF16 or AMX-BF16).

    Without it torch emulates bf16 GEMMs, about 20× slower than fp32 on the AVX2-only hosts
    seen here: a bf16 LLaMA-2-7B-layer dry run then takes over ten minutes instead of one.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    if "flags" not in cpuinfo:  # not x86 Linux: nothing to read, assume native
        return True
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


NATIVE_BF16 = cpu_has_native_bf16()
# The LLaMA dry runs load the bf16 folder as the paper config does where bf16 is native, else in fp32
# (the same architecture, shapes and code path; bf16 storage is checked on the folder itself).
LLAMA_EXTRA = () if NATIVE_BF16 else ("model.dtype=fp32",)
LLAMA_DTYPE = "bf16" if NATIVE_BF16 else "fp32"
NO_NATIVE_BF16 = "this CPU has no native bf16 (avx512_bf16/amx_bf16): emulated bf16 GEMMs are ~20x slower than fp32"
# The instruct runs keep gradient accumulation (micro-batch 1 x 2) on fewer, shorter batches.
CUT = Cut(instruct_batch=2, instruct_micro=1, instruct_train=4, instruct_dev=2)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = data_dir()
    data, standins = check_data_dir(shapes_root() / "data", root)
    return SimpleNamespace(
        roberta=paper_shape_folder("roberta-base", data_dir=root),
        llama=paper_shape_folder("llama2-7b", data_dir=root),  # 1 decoder layer, bf16
        data=data, standins=standins, runs=tmp_path_factory.mktemp("check-paper"),
    )


def run(combination, *extra):
    outcome = run_combination(combination, *extra, timeout=600, log_dir=combination.run_dir.parent / "logs")
    assert outcome.ok, outcome.line()
    return outcome.record


def glue_run(shapes, name, task="mrpc", method="melora_n8_r1", *extra):
    (combination,) = glue_combinations(shapes.roberta, shapes.data, shapes.runs / name, CUT, [task], [method])
    return run(combination, *extra)


def instruct_runs(shapes, name, method="melora_n8_r1", evaluate=False):
    return instruct_combinations(shapes.llama, shapes.data, shapes.runs / name, CUT, [method], evaluate=evaluate)


@pytest.fixture(scope="module")
def instruct_plain(shapes):
    """The instruct path (Alpaca, MELoRA r=1 n=8) and INSTRUCTEVAL's MMLU on its adapter."""
    train, evaluation = instruct_runs(shapes, "plain", evaluate=True)
    return SimpleNamespace(record=run(train, *LLAMA_EXTRA), eval_record=run(evaluation, *LLAMA_EXTRA), run_dir=train.run_dir)


# ---------------------------------------------------------------- folders and data


def test_folders_have_the_paper_architectures(shapes):
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaModel

    roberta = AutoConfig.from_pretrained(shapes.roberta)
    assert (roberta.hidden_size, roberta.num_hidden_layers, roberta.num_attention_heads, roberta.intermediate_size) == (768, 12, 12, 3072)
    assert (roberta.vocab_size, roberta.max_position_embeddings, roberta.type_vocab_size) == (50265, 514, 1)
    llama = AutoConfig.from_pretrained(shapes.llama)
    assert (llama.hidden_size, llama.intermediate_size, llama.num_attention_heads, llama.num_key_value_heads) == (4096, 11008, 32, 32)
    assert (llama.vocab_size, llama.max_position_embeddings, llama.num_hidden_layers) == (32000, 4096, 1)
    # Parameter counts of the full models, built on the meta device from the same constants:
    # roberta-base 124,645,632 (RobertaModel with pooler); LLaMA-2-7B 6,738,415,616 =
    # 32 layers x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 2 x 32000 x 4096 + 4096.
    with torch.device("meta"):
        assert sum(p.numel() for p in RobertaModel(RobertaConfig(**ROBERTA_BASE)).parameters()) == 124_645_632
        assert sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**LLAMA2_7B, num_hidden_layers=32)).parameters()) == 6_738_415_616
    with safe_open(str(shapes.llama / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [4096, 4096]
    roberta_tok, llama_tok = AutoTokenizer.from_pretrained(shapes.roberta), AutoTokenizer.from_pretrained(shapes.llama)
    assert (roberta_tok.bos_token_id, roberta_tok.pad_token_id, roberta_tok.eos_token_id, len(roberta_tok)) == (0, 1, 2, 50265)
    assert (llama_tok.unk_token_id, llama_tok.bos_token_id, llama_tok.eos_token_id, len(llama_tok)) == (0, 1, 2, 32000)
    assert llama_tok("Hello").input_ids[0] == 1  # LLaMA prepends <s>
    assert paper_shape_folder("roberta-base", data_dir=data_dir()) == shapes.roberta  # cached: not rebuilt


def test_stand_ins_fill_the_glue_files_this_machine_lacks(shapes):
    from melora.experiments.data.glue import load_glue

    assert set(shapes.standins) <= {f"{task}/{f}" for task, files in STANDIN_FILES.items() for f in files}
    for task, labels in (("mnli", 3), ("qqp", 2), ("qnli", 2)):
        ds = load_glue(task, data_dir=shapes.data, source="local")
        assert len(ds["train"]) >= 256 and set(ds["train"]["label"]) == set(range(labels))
    real = load_glue("rte", data_dir=shapes.data, source="local")  # real tasks are linked as they are
    assert (len(real["train"]), len(real["validation"])) == (2490, 277)


def test_one_line_error_picks_the_exception():
    hint = "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
    stderr = "[..][INFO] - loading\nTraceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'q_proj'\n" + hint
    assert one_line_error(stderr) == "KeyError: 'q_proj'"
    hydra = "Could not override 'method.n'.\nTo append to your config use +method.n=5\nKey 'n' is not in struct\n" + hint
    assert one_line_error(hydra) == "Could not override 'method.n'. To append to your config use +method.n=5 Key 'n' is not in struct"
    assert one_line_error("Error: method.n=5 does not divide 768; use one of 1, 2, 3, 4, 6, 8\n").startswith("Error: method.n=5")


# ---------------------------------------------------------------- runs


def test_glue_melora_on_roberta_base(shapes):
    record = glue_run(shapes, "glue-fp32")
    # 24 adapted layers (12 x query/value), each (768 + 768) x r=1 x n=8 / 8 = 1,536 adapter params.
    assert record["adapter_params"] == 24 * 1536 and record["equivalent_rank"] == 8
    assert record["mixed_precision"] == "no" and record["global_step"] == 2
    assert record["config"]["task"]["lr"] == 4e-4 and record["config"]["task"]["max_length"] == 256  # the paper's


def test_glue_bf16_mixed_precision_completes_on_cpu(shapes):
    record = glue_run(shapes, "glue-bf16", "mrpc", "melora_n8_r1", "trainer.mixed_precision=bf16")
    assert record["mixed_precision"] == "bf16"
    assert torch.isfinite(torch.tensor(record["last_train_loss"]))
    adapter = shapes.runs / "glue-bf16" / "glue" / "mrpc" / "melora_n8_r1" / "adapter" / "adapter_model.safetensors"
    assert all(t.dtype == torch.float32 for t in load_file(str(adapter)).values())


def test_instruct_and_instructeval_on_llama2_7b_layers(shapes, instruct_plain):
    record = instruct_plain.record
    # q_proj and v_proj of 1 layer: (4096 + 4096) x r=1 each.
    assert record["adapter_params"] == 2 * 8192 and record["equivalent_rank"] == 8
    assert record["model_dtype"] == LLAMA_DTYPE and record["gradient_accumulation"] == 2 and record["global_step"] == 2
    adapter = load_file(str(instruct_plain.run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())  # fp32 adapters on the bf16 base
    evaluation = instruct_plain.eval_record
    assert evaluation["tasks"] == ["mmlu"] and evaluation["n_examples"] == {"mmlu": 1} and evaluation["merged"]


@pytest.mark.skipif(not NATIVE_BF16, reason=NO_NATIVE_BF16)
def test_instruct_bf16_mixed_precision_completes_on_cpu(shapes):
    (train,) = instruct_runs(shapes, "bf16")
    record = run(train, "trainer.mixed_precision=bf16")
    assert record["mixed_precision"] == "bf16" and torch.isfinite(torch.tensor(record["history"][-1]["dev_loss"]))


def test_gradient_checkpointing_gives_the_same_losses_and_adapter(shapes, instruct_plain):
    """Recomputing activations must not change the training.

    Tolerances: losses within 1e-6 (relative), the dev loss's change over the
    run within 1e-3 of itself, adapter entries within 1e-4 (relative) + 1e-8
    (B is ~3e-6 after the paper's warm-up: one wrong-signed gradient entry shows).
    Both runs see the same data and dropout masks (checkpointing replays the
    RNG state); only the order of floating-point operations may differ. On
    this CPU they agree exactly.
    """
    (train,) = instruct_runs(shapes, "ckpt")
    ckpt, plain = run(train, "model.gradient_checkpointing=true", *LLAMA_EXTRA), instruct_plain.record
    assert ckpt["gradient_checkpointing"] and not plain["gradient_checkpointing"]
    for key in ("train_loss", "dev_loss"):
        assert [h[key] for h in ckpt["history"]] == pytest.approx([h[key] for h in plain["history"]], rel=1e-6)
    change = [r["history"][-1]["dev_loss"] - r["dev_loss_at_start"] for r in (ckpt, plain)]
    assert change[1] != 0 and change[0] == pytest.approx(change[1], rel=1e-3)
    a = load_file(str(train.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(instruct_plain.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(b[k].abs().max() > 0 for k in b if k.endswith("lora_B"))  # B moved off zero
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-8)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_every_paper_configuration(tmp_path):
    """``make check-paper``: 8 GLUE tasks x 6 methods, and LoRA r=64 / MELoRA r=1 n=8 on Alpaca + MMLU."""
    data_dir()
    command = [sys.executable, str(ROOT / "scripts" / "check_paper.py"), "--runs", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok ", "FAIL"))]
    assert proc.returncode == 0, "\n".join(line for line in lines if line.startswith("FAIL")) or proc.stderr[-2000:]
    assert len(lines) == len(GLUE_TASKS) * len(GLUE_METHODS) + 2 * len(INSTRUCT_METHODS)
    assert "cut for CPU" in proc.stdout
