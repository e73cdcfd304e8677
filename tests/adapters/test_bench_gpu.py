"""scripts/bench_gpu.py without a GPU: its grid, its report on fake timings, its skip, and its measuring code at toy sizes."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from melora.adapters.melora import FORMULATIONS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_script()
VARIANTS = ["base", "melora", *[f"melora_{path}" for path in FORMULATIONS], "peft_lora_nr", "peft_lora_r", "mini_loop"]


def test_the_grid_of_the_issue():
    configs = bench.layer_configs(bench.LAYER_GRID)
    assert len(configs) == 2 * 6 * 3 * 2 == len(set(configs))
    assert {c[0] for c in configs} == {768, 4096} and {c[1] for c in configs} == {1, 2, 4, 8, 16, 64}
    assert {c[2] for c in configs} == {1, 2, 8} and {c[3] for c in configs} == {512, 4096}
    keys = bench.group_modules(bench.LAYER_GRID["n"], bench.LAYER_GRID["r"])
    assert sorted(k[1] for k in keys if k[0] == "peft") == [1, 2, 4, 8, 16, 32, 64, 128, 512]  # once per rank: r and n·r
    assert sum(k[0] == "melora" for k in keys) == 18 * (1 + len(FORMULATIONS)) and sum(k[0] == "mini_loop" for k in keys) == 18
    assert list(bench.variant_keys(8, 2)) == VARIANTS and bench.variant_keys(8, 2)["peft_lora_nr"] == ("peft", 16)
    assert bench.layer_configs({"d": [24], "n": [1, 5, 8], "r": [1], "tokens": [8]}) == [(24, 1, 1, 8), (24, 8, 1, 8)]


def fake_rows(slow: dict | None = None):
    """Layer and step rows where MELoRA is 1 % faster than every baseline, except the ``slow`` factors given."""
    slow = slow or {}
    rows = []
    for d, n, r, T in bench.layer_configs(bench.LAYER_GRID):
        ms = {v: 1.0 for v in VARIANTS} | {"base": 0.5, "melora": 0.99 * slow.get((d, n, r, T), 1.0)}
        for variant, value in ms.items():
            path = "dense" if variant == "melora" else variant.removeprefix("melora_") if variant.startswith("melora_") else ""
            rows.append({"kind": "layer", "model": "", "device": "cuda", "dtype": "bfloat16", "d": d, "n": n, "r": r, "T": T,
                         "variant": variant, "path": path, "ms": value, "min_ms": value, "reps": 15, "ratio_to_base": value / 0.5})  # fmt: skip
    for model in bench.STEP_MODELS:
        for variant, value in {"melora": 10.0 * slow.get(model, 1.0), "peft_lora_nr": 10.1, "peft_lora_r": 10.0}.items():
            rows.append({"kind": "step", "model": model, "device": "cuda", "dtype": "bf16-autocast", "d": 768, "n": 8, "r": 1,
                         "T": 8192, "variant": variant, "path": "fused" if variant == "melora" else "", "ms": value,
                         "min_ms": value, "reps": 10, "ratio_to_base": ""})  # fmt: skip
    return rows


def test_report_passes_and_fails_on_fake_timings(tmp_path):
    targets = bench.evaluate_targets(fake_rows())
    assert [t["status"] for t in targets] == ["PASS"] * 4, targets
    assert "0/72 configs over" in targets[0]["text"] and "0/36 configs over" in targets[2]["text"]

    rows = fake_rows({(4096, 64, 8, 4096): 1.05, "llama2-7b-2layers": 1.05})  # 1.04 × the baselines
    targets = bench.write_outputs(tmp_path, rows, {"device": "fake GPU", "wall": "0.1 min"})
    assert [t["status"] for t in targets] == ["FAIL", "FAIL", "PASS", "FAIL"]
    assert "worst 1.040 (need ≤ 1.03) at d=4096 n=64 r=8 T=4096; 1/72 configs over" in targets[0]["text"]
    assert "at llama2-7b-2layers n=8 r=1" in targets[3]["text"]
    md = (tmp_path / "gpu.md").read_text()
    assert "- **FAIL** 1. layer: MELoRA(n, r) ≤ 1.03 × PEFT LoRA rank n·r" in md and "- Device: fake GPU" in md
    assert "### d = 4096, T = 4096; base 0.500 ms" in md
    assert "| 64 | 8 | dense | bmm | 1.040 (2.08×) |" in md  # chosen path, fastest forced path (first of the ties), cells
    assert "| llama2-7b-2layers | 8 | 1 | 8192 | melora | fused | 10.50 | 1.000 |" in md
    with open(tmp_path / "gpu.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == bench.CSV_FIELDS and len(table) == 72 * len(VARIANTS) + 2 * 3


def test_without_cuda_it_skips_with_one_line_and_exit_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == bench.SKIP_MESSAGE
    assert not any(tmp_path.iterdir())


def test_the_measuring_code_runs_at_toy_sizes_on_cpu():
    """The code paths a GPU run takes (perf_counter stands in for CUDA events): a check of the script, not a measurement."""
    rows = bench.measure_layer_group(torch.device("cpu"), torch.float32, 32, 64, [1, 4], [1, 2], warmup=1, reps=2)
    assert len(rows) == 4 * len(VARIANTS) and all(row["reps"] == 2 and row["ms"] > 0 for row in rows)
    paths = {(row["n"], row["r"], row["variant"]): row["path"] for row in rows}
    assert paths[(4, 2, "melora_fused")] == "fused" and paths[(4, 2, "melora")] in FORMULATIONS
    assert paths[(4, 2, "peft_lora_nr")] == ""
    for name, spec in bench.STEP_MODELS.items():
        toy = {**spec, "layers": 1, "batch": 2, "seq": 8}
        steps = bench.measure_steps(name, toy, torch.device("cpu"), 8, 1, warmup=1, reps=2, hidden=32)
        assert [row["variant"] for row in steps] == ["melora", "peft_lora_nr", "peft_lora_r"]
        assert steps[0]["path"] and steps[0]["d"] == 32 and steps[0]["T"] == 16
    report = bench.render_markdown(rows + steps, bench.evaluate_targets(rows + steps), {})
    assert "## Layer, forward + backward" in report and "## Training step" in report
