"""scripts/bench_layer.py: its targets on fake timings, and a real run at toy sizes (no speed is asserted)."""

import csv
import importlib.util
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from melora.adapters.melora import FORMULATIONS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_layer.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_script()


def run_toy(tmp_path, args: str) -> list[dict]:
    """``bench.main`` on a toy ``32x64`` group at 1 thread with ``args``; its CSV rows (``<tmp_path>/toy.csv``)."""
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--out", str(tmp_path), "--name", "toy", "--shapes", "32x64", "--threads", "1", *args.split()]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets the process's thread count
    return list(csv.DictReader((tmp_path / "toy.csv").open()))


def fake_rows(melora_ms: dict | None = None):
    """fwd+bwd and fwd rows where every variant takes 1 ms, MELoRA 0.99 ms unless ``melora_ms`` says otherwise."""
    melora_ms = melora_ms or {}
    rows = []
    for d in (768, 4096):
        for n, r in ((1, 1), (2, 8), (8, 1)):
            for mode in ("fwd", "fwdbwd"):
                variants = {
                    "base": 0.5,
                    "melora": melora_ms.get((d, n, r, mode), 0.99),
                    "peft_lora_nr": 1.0,
                    "peft_lora_r": 1.0,
                    "mini_loop": 1.0,
                    **({"melora_merged": 0.5, "merged_linear": 0.5} if mode == "fwd" else {}),
                }
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


def test_merged_target_is_judged_against_the_merged_layers_own_linear():
    """Target 3 divides by ``merged_linear`` (the same weight memory), not by the shared ``base``."""
    rows = fake_rows()
    for row in rows:
        if row["variant"] == "base":
            row["ms"] = row["min_ms"] = 0.4  # a cache-hot shared weight: merged/base = 1.25
    assert bench.evaluate_targets(rows, noise_tol=0.03)[3]["status"] == "PASS"
    for row in rows:
        if row["variant"] == "melora_merged" and row["d"] == 768:
            row["ms"] = row["min_ms"] = 0.53  # 1.06 x its own linear
    target = bench.evaluate_targets(rows, noise_tol=0.03)[3]
    assert target["status"] == "FAIL" and "worst 1.060" in target["text"] and "merged/its frozen linear" in target["text"]


def test_a_toy_run_writes_named_reports_for_the_shapes_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "MIN_REPS", {"base": 1, "block_diag": 1})
    monkeypatch.setattr(bench, "DEFAULT_MIN_REPS", 1)
    rows = run_toy(tmp_path, "--n 1,4 --r 2 --paths --budget 0.001 --max-reps 2")
    assert {(r["d"], r["T"]) for r in rows} == {("32", "64")}
    chosen = {(r["n"], r["mode"]): r["path"] for r in rows if r["variant"] == "melora"}
    assert chosen == {("1", "fwd"): "dense", ("4", "fwd"): "bmm", ("1", "fwdbwd"): "fused", ("4", "fwdbwd"): "fused_dense"}
    assert {r["variant"] for r in rows} >= {f"melora_{path}" for path in FORMULATIONS} | {"peft_lora_nr", "mini_loop"}
    assert "## Targets (full layer)" in (tmp_path / "toy.md").read_text()


def test_min_reps_gives_every_timed_module_that_many_samples(tmp_path, monkeypatch):
    """--min-reps overrides a budget too small for slow calls; block_diag, a reference, keeps its one sample."""
    rows = run_toy(tmp_path, "--n 1,4 --r 2 --budget 0.000001 --min-reps 6")
    reps = {r["variant"]: int(r["reps"]) for r in rows}
    assert reps["block_diag"] == 1
    assert all(n >= 6 for variant, n in reps.items() if variant != "block_diag"), reps
    assert "(≥ 6, base ≥ 6, block_diag ≥ 1," in (tmp_path / "toy.md").read_text()


def fake_jobs(warm_s: dict[str, float], min_reps: int = 3):
    """Jobs named by ``warm_s``'s keys whose every call takes that many fake seconds; ``calls`` logs their order."""
    calls = []
    jobs = [bench.Job(key=(name,), call=lambda name=name: calls.append(name), reset=lambda: None, min_reps=min_reps)
            for name in warm_s]  # fmt: skip
    return jobs, calls


def fake_time_once(warm_s):
    def time_once(job, sync):
        job.call()
        return warm_s[job.key[0]]

    return time_once


def test_lockstep_gives_every_job_one_sample_per_round(monkeypatch):
    """All jobs get the largest target (capped by max_reps); no warm-up is kept, however heavy; rounds alternate."""
    warm_s = {"fast": 0.01, "mid": 0.1, "heavy": 2 * bench.HEAVY_CALL_S}
    monkeypatch.setattr(bench, "time_once", fake_time_once(warm_s))
    jobs, _ = fake_jobs(warm_s)
    bench.run_round_robin(jobs, budget_s=0.2, max_reps=40, sync=None)
    assert [len(job.samples) for job in jobs] == [20, 3, 3]  # default: budget / call, and the heavy warm-up kept
    jobs, calls = fake_jobs(warm_s)
    bench.run_round_robin(jobs, budget_s=0.2, max_reps=40, sync=None, lockstep=True)
    assert [job.target for job in jobs] == [20, 3, 3]
    assert [len(job.samples) for job in jobs] == [20, 20, 20]
    assert calls[:9] == ["fast", "mid", "heavy", "fast", "mid", "heavy", "heavy", "mid", "fast"]  # warm-ups, rounds 0, 1
    assert len(calls) == 3 + 3 * 20
    jobs, _ = fake_jobs(warm_s)
    bench.run_round_robin(jobs, budget_s=0.2, max_reps=7, sync=None, lockstep=True)
    assert [len(job.samples) for job in jobs] == [7, 7, 7]


def test_lockstep_order_puts_each_target_pair_together_and_covers_the_group():
    base = torch.nn.Linear(16, 16).requires_grad_(False)
    for mode in ("fwd", "fwdbwd"):
        order = bench.lockstep_order([1, 4], [2], mode, paths=True)
        assert len(order) == len(set(order))
        assert set(order) == set(bench.build_modules(base, [1, 4], [2], mode, paths=True))
    order = bench.lockstep_order([1, 4], [2], "fwd")
    assert order[:3] == [("base",), ("merged_linear",), ("merged",)]
    assert order[order.index(("melora", 4, 2)) - 1 : order.index(("melora", 4, 2)) + 2] == [
        ("peft", 8, 4, 2),
        ("melora", 4, 2),
        ("peft", 2, 4, 2),
    ]
    assert order[order.index(("melora", 4, 2)) - 2] == ("mini_loop", 4, 2)
    # one PEFT module per config and rank, n = 1 one for both ranks; never shared between configs
    assert [key for key in order if key[0] == "peft"] == [("peft", 2, 1, 2), ("peft", 8, 4, 2), ("peft", 2, 4, 2)]


def test_paired_ratio_is_the_median_of_per_round_ratios():
    a, b = [2.0, 4.0, 3.0, 8.0, 5.0, 6.0], [1.0, 4.0, 2.0, 4.0, 5.0, 3.0]
    # ratios 2, 1, 1.5, 2, 1, 2 -> median 1.75 (the ratio of medians would be 4.5 / 3.5); 6 rounds: the range at 96.9 %
    assert bench.paired_ratio(a, b) == (1.75, 1.0, 2.0)
    # n = 40: P(X <= 13) = 0.019 <= 0.025 < P(X <= 14) = 0.040 for X ~ Binomial(40, 1/2): the 14th and 27th values
    assert bench.median_ci([float(v) for v in range(40, 0, -1)]) == (14.0, 27.0)
    lo, hi = bench.median_ci([1.0, 2.0, 3.0, 4.0, 5.0])  # 5 values cannot reach 95 %
    assert lo != lo and hi != hi


def test_group_rows_of_a_lockstep_run_carry_the_paired_ratios():
    samples = {("base",): [1.0, 2.0, 1.0, 1.0, 1.0, 1.0], ("merged",): [1.0, 2.2, 0.9, 1.0, 1.1, 1.0],
               ("merged_linear",): [0.5, 1.1, 0.45, 0.5, 0.55, 0.5],
               ("melora", 2, 1): [2.0, 4.0, 3.0, 8.0, 5.0, 6.0], ("peft", 2, 2, 1): [1.0, 4.0, 2.0, 4.0, 5.0, 3.0],
               ("peft", 1, 2, 1): [2.0, 4.0, 3.0, 8.0, 5.0, 6.0], ("mini_loop", 2, 1): [4.0, 8.0, 6.0, 16.0, 10.0, 12.0],
               ("block_diag", 2, 1): [9.0] * 6}  # fmt: skip
    jobs = {
        key: bench.Job(key=key, call=None, reset=None, min_reps=1, samples=[s / 1e3 for s in values]) for key, values in samples.items()
    }
    args = SimpleNamespace(n=[2], r=[1], paths=False, lockstep=True)
    rows = {row["variant"]: row for row in bench.group_rows("cpu", "fp32", 16, 64, "fwd", jobs, args)}
    melora = rows["melora"]
    assert (melora["paired_vs_peft_nr"], melora["paired_vs_peft_nr_lo"], melora["paired_vs_peft_nr_hi"]) == (1.75, 1.0, 2.0)
    assert (melora["paired_vs_loop"], melora["paired_vs_loop_lo"], melora["paired_vs_loop_hi"]) == (0.5, 0.5, 0.5)
    assert melora["paired_vs_peft_r"] == 1.0
    assert rows["melora_merged"]["paired_vs_base"] == 1.0  # ratios 1, 1.1, 0.9, 1, 1.1, 1
    assert (rows["melora_merged"]["paired_vs_base_lo"], rows["melora_merged"]["paired_vs_base_hi"]) == (0.9, 1.1)
    assert rows["melora_merged"]["paired_vs_merged_linear"] == 2.0  # every round 2 x
    assert "paired_vs_merged_linear" not in rows["merged_linear"]
    assert not any(column.startswith("paired") for variant in ("base", "peft_lora_nr", "block_diag") for column in rows[variant])
    args.lockstep = False
    assert not any(column.startswith("paired") for row in bench.group_rows("cpu", "fp32", 16, 64, "fwd", jobs, args) for column in row)


def paired_rows(paired: dict | None = None):
    """``fake_rows`` with the paired columns of a lockstep run: every paired ratio 0.99 [0.97, 1.01], merged/base 1.0
    [0.98, 1.02], unless ``paired[(d, n, r, column)]`` (or ``[(d, column)]``, one value per group as in a real run)
    gives ``(value, lo, hi)``; medians say MELoRA is fine."""
    paired = paired or {}
    rows = fake_rows()
    for row in rows:
        for column, (variant, _) in bench.PAIRED.items():
            if row["variant"] == variant:
                default = (1.0, 0.98, 1.02) if column in ("paired_vs_base", "paired_vs_merged_linear") else (0.99, 0.97, 1.01)
                value = paired.get((row["d"], row["n"], row["r"], column), paired.get((row["d"], column), default))
                row.update(zip((column, f"{column}_lo", f"{column}_hi"), value))
    return rows


def test_paired_targets_judge_the_paired_columns_and_say_if_a_fail_is_beyond_noise():
    targets = bench.evaluate_targets(paired_rows(), noise_tol=0.03, stat="paired")
    assert [t["status"] for t in targets] == ["PASS"] * 4, targets
    assert "paired ratio MELoRA/PEFT, 95 % interval at the worst [0.970, 1.010]" in targets[0]["text"]
    slow = paired_rows(
        {
            (768, 8, 1, "paired_vs_peft_nr"): (1.04, 1.01, 1.07),  # FAIL, but within noise
            (4096, 2, 8, "paired_vs_loop"): (1.06, 1.04, 1.08),  # FAIL beyond noise
            (4096, 1, 1, "paired_vs_peft_r"): (1.049, 1.02, 1.08),
            (768, "paired_vs_merged_linear"): (1.06, 1.055, 1.07),
            (4096, "paired_vs_base"): (1.2, 1.1, 1.3),
        }
    )  # reported, not judged; fmt: skip
    targets = bench.evaluate_targets(slow, noise_tol=0.03, stat="paired")
    assert [t["status"] for t in targets] == ["FAIL", "FAIL", "PASS", "FAIL"], targets
    assert "worst 1.040" in targets[0]["text"] and "d=768 n=8 r=1" in targets[0]["text"]
    assert "[1.010, 1.070]" in targets[0]["text"] and "0/6 with the interval above 1.03" in targets[0]["text"]
    assert "worst 1.060" in targets[1]["text"] and "1/6 with the interval above 1.03" in targets[1]["text"]
    assert "over 2 (d, T) groups" in targets[3]["text"] and "1/2 with the interval above 1.05" in targets[3]["text"]
    # the medians of the same rows are untouched by the paired columns
    assert [t["status"] for t in bench.evaluate_targets(slow, noise_tol=0.03)] == ["PASS"] * 4


def test_paired_targets_are_na_on_rows_without_paired_columns():
    """Runs without --lockstep, and older CSVs (read back as text), lack the paired columns."""
    assert [t["status"] for t in bench.evaluate_targets(fake_rows(), 0.03, "paired")] == ["n/a"] * 4
    old = list(csv.DictReader(io.StringIO("device,dtype,d,n,r,T,variant,mode,ms,ratio_to_base,min_ms,reps,spread_pct,path\n"
                                          "cpu,fp32,4096,1,1,512,melora,fwdbwd,1.0,1.0,1.0,11,1.0,fused\n")))  # fmt: skip
    assert [t["status"] for t in bench.evaluate_targets(old, 0.03, "paired")] == ["n/a"] * 4


def test_a_toy_lockstep_run_writes_the_paired_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "MIN_REPS", {"base": 1, "block_diag": 1})
    rows = run_toy(tmp_path, "--n 1,4 --r 2 --budget 0.000001 --min-reps 6 --max-reps 6 --lockstep")
    assert list(rows[0]) == bench.CSV_FIELDS
    assert {int(r["reps"]) for r in rows if r["variant"] != "block_diag"} == {6}
    assert {int(r["reps"]) for r in rows if r["variant"] == "block_diag"} == {1}  # its warm-up: a reference in no pair
    for row in rows:
        for column, (variant, _) in bench.PAIRED.items():
            if row["variant"] == variant and (column, row["mode"]) != ("paired_vs_base", "fwdbwd"):
                value, lo, hi = (float(row[column + end]) for end in ("", "_lo", "_hi"))
                assert 0 < lo <= value <= hi, (row, column)
            else:
                assert row[column] == row[column + "_lo"] == row[column + "_hi"] == "", (row, column)
    assert {r["mode"] for r in rows if r["paired_vs_base"]} == {"fwd"}
    report = (tmp_path / "toy.md").read_text()
    assert "lockstep round-robin (`--lockstep`)" in report
    assert report.count("*On paired per-round ratios: ") == 4
    assert "Paired ratios (median over rounds of the per-round ratio [95 % interval])" in report


def test_modes_limit_the_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "MIN_REPS", {"base": 1, "block_diag": 1})
    rows = run_toy(tmp_path, "--n 2 --r 1 --modes fwdbwd --budget 0.000001 --min-reps 3 --max-reps 3 --lockstep")
    assert {r["mode"] for r in rows} == {"fwdbwd"}
