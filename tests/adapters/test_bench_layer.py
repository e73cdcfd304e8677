"""scripts/bench_layer.py: its targets on fake timings, and a real run at toy sizes (no speed is asserted)."""

import csv
import importlib.util
import sys
from pathlib import Path

import torch

from melora.adapters.melora import PATHS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_layer.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_script()


def fake_rows(melora_ms: dict | None = None):
    """fwd+bwd and fwd rows where every variant takes 1 ms, MELoRA 0.99 ms unless ``melora_ms`` says otherwise."""
    melora_ms = melora_ms or {}
    rows = []
    for d in (768, 4096):
        for n, r in ((1, 1), (2, 8), (8, 1)):
            for mode in ("fwd", "fwdbwd"):
                variants = {"base": 0.5, "melora": melora_ms.get((d, n, r, mode), 0.99), "peft_lora_nr": 1.0, "peft_lora_r": 1.0,
                            "mini_loop": 1.0, **({"melora_merged": 0.5} if mode == "fwd" else {})}
                for variant, ms in variants.items():
                    rows.append({"device": "cpu", "dtype": "fp32", "d": d, "n": n, "r": r, "T": 512, "variant": variant,
                                 "mode": mode, "ms": ms, "min_ms": ms})  # fmt: skip
    return rows


def test_targets_are_the_issues_and_name_the_worst_config():
    targets = bench.evaluate_targets(fake_rows(), noise_tol=0.03)
    assert [t["status"] for t in targets] == ["PASS"] * 4, targets
    assert "0/6 configs above 1.0" in targets[0]["text"] and "0/3 configs above 1.0" in targets[2]["text"]
    slow = bench.evaluate_targets(fake_rows({(768, 8, 1, "fwdbwd"): 1.04, (4096, 2, 8, "fwdbwd"): 1.06}), noise_tol=0.03)
    assert [t["status"] for t in slow] == ["FAIL", "FAIL", "FAIL", "PASS"]
    assert "worst 1.060" in slow[0]["text"] and "d=4096 n=2 r=8" in slow[0]["text"]
    assert "2/6 configs above 1.0" in slow[1]["text"]
    assert "worst 1.060" in slow[2]["text"]  # 1.06 > 1.05 at d=4096 against PEFT LoRA rank r
    assert bench.evaluate_targets(fake_rows({(768, 8, 1, "fwdbwd"): 1.02}), noise_tol=0.03)[0]["status"] == "PASS"  # within noise


def test_a_toy_run_writes_named_reports_for_the_shapes_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "MIN_REPS", {"base": 1, "block_diag": 1})
    monkeypatch.setattr(bench, "DEFAULT_MIN_REPS", 1)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--out", str(tmp_path), "--name", "toy", "--shapes", "32x64", "--n", "1,4", "--r", "2",
                           "--paths", "--budget", "0.001", "--max-reps", "2", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets the process's thread count
    rows = list(csv.DictReader((tmp_path / "toy.csv").open()))
    assert {(r["d"], r["T"]) for r in rows} == {("32", "64")}
    chosen = {(r["n"], r["mode"]): r["path"] for r in rows if r["variant"] == "melora"}
    assert chosen == {("1", "fwd"): "dense", ("4", "fwd"): "bmm", ("1", "fwdbwd"): "fused", ("4", "fwdbwd"): "fused_dense"}
    assert {r["variant"] for r in rows} >= {f"melora_{path}" for path in PATHS} | {"peft_lora_nr", "mini_loop"}
    assert "## Targets (full layer)" in (tmp_path / "toy.md").read_text()


def test_min_reps_gives_every_timed_module_that_many_samples(tmp_path, monkeypatch):
    """--min-reps overrides a budget too small for slow calls; block_diag, a reference, keeps its one sample."""
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--out", str(tmp_path), "--name", "toy", "--shapes", "32x64", "--n", "1,4", "--r", "2",
                           "--budget", "0.000001", "--min-reps", "6", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader((tmp_path / "toy.csv").open()))
    reps = {r["variant"]: int(r["reps"]) for r in rows}
    assert reps["block_diag"] == 1
    assert all(n >= 6 for variant, n in reps.items() if variant != "block_diag"), reps
    assert "(≥ 6, base ≥ 6, block_diag ≥ 1," in (tmp_path / "toy.md").read_text()
