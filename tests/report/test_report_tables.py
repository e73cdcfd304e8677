"""Tables from synthetic records: means, stds, best-n picks, left-out runs, ×100 formatting."""

import csv
import io
import json
import re
from pathlib import Path

import pytest

from melora.experiments.report.paper import NOT_AVAILABLE, table2, table3, table4, table5
from melora.experiments.report.records import load_records
from melora.experiments.report.render import to_csv, to_latex, to_markdown, write_table

METRICS = {"mrpc": "accuracy", "stsb": "pearson", "cola": "matthews_correlation", "sst2": "accuracy"}
# (d_in + d_out) · r per adapted layer × 12 layers (MiniLM: 6 blocks × query, value; 384 → 384).
PARAMS_PER_RANK = 12 * 768


def fake_record(root: Path, task: str, tag: str, seed: int, value: float | None, status: str = "completed",
                profile: str = "unit", model: str = "minilm", kind: str = "glue", **extra) -> dict:
    """A record.json as melora.experiments.glue writes it (only the fields the report reads are realistic)."""
    m = re.fullmatch(r"(melora)_n(\d+)_r(\d+)|(lora|dylora|delta_lora|adalora)_r(\d+)", tag)
    method = m.group(1) or m.group(4)
    n, r = (int(m.group(2)), int(m.group(3))) if m.group(1) else (1, int(m.group(5)))
    record = {
        "name": f"{task}/{model}/{tag}/seed{seed}", "kind": kind, "profile": profile, "task": task,
        "metric": METRICS.get(task, "dev_loss"), "model": model, "model_name_or_path": f"org/{model}",
        "method": method, "method_tag": tag, "method_config": {"method": method, "n": n, "r": r, "alpha": 16},
        "seed": seed, "eval_sizes": {"validation": 400}, "config": {"model": {"name": model}},
        "status": status, "adapter_params": n * r * PARAMS_PER_RANK // n if method == "melora" else r * PARAMS_PER_RANK,
        "train_size": 2000, "best_metric": value, "started_at": 1_790_000_000.0 + seed * 86_400,
        "device": {"cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2},
    }
    record.update(extra)
    folder = root / profile / f"{kind}-{task}" / model / tag / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").write_text(json.dumps(record))
    return record


def glue_runs(root: Path) -> Path:
    """Two tasks × three seeds; one failed and one unfinished run; MELoRA r=1 only on MRPC."""
    data = {
        ("mrpc", "lora_r8"): [0.80, 0.82, 0.84],
        ("stsb", "lora_r8"): [0.88, 0.89, 0.90],
        ("mrpc", "melora_n2_r8"): [0.85, 0.85, 0.85],
        ("stsb", "melora_n2_r8"): [0.90, 0.91, 0.92],
        ("mrpc", "melora_n4_r8"): [0.86, 0.87, 0.88],
        ("stsb", "melora_n4_r8"): [0.89, 0.89, 0.89],
        ("mrpc", "melora_n8_r8"): [None, 0.90, 0.92],  # seed 0 failed
        ("stsb", "melora_n8_r8"): [None, 0.80, 0.80],  # seed 0 still running
        ("mrpc", "melora_n2_r1"): [0.81, 0.81, 0.81],
    }
    for (task, tag), values in data.items():
        for seed, value in enumerate(values):
            if value is not None:
                fake_record(root, task, tag, seed, value)
    fake_record(root, "mrpc", "melora_n8_r8", 0, None, status="failed", error="loss is nan at step 3 (epoch 0)")
    fake_record(root, "stsb", "melora_n8_r8", 0, 0.95, status="running")
    fake_record(root, "rte", "lora_r8", 0, 0.70, profile="other")  # another profile: never mixed in
    return root


@pytest.fixture
def records(tmp_path):
    return [r for r in load_records(glue_runs(tmp_path)) if r["profile"] == "unit"]


def rows_of(markdown: str) -> dict[str, list[str]]:
    lines = [l for l in markdown.splitlines() if l.startswith("| ") and not l.startswith("| Method") and not l.startswith("| R |")]
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def test_table2_cells_best_n_and_params(records):
    table = table2(records, profile="unit")
    assert [c.label for c in table.columns] == ["MRPC", "STS-B"]  # no spec profile "unit": the tasks present
    rows = rows_of(to_markdown(table))
    #                         Params   MRPC                         STS-B                 Avg    Paper
    assert rows["LoRA r=8"] == ["73.7K", "82.0 ± 2.0", "89.0 ± 1.0", "85.5", NOT_AVAILABLE]
    assert rows["DyLoRA r=8"] == ["—", "—", "—", "—", NOT_AVAILABLE]
    # best n per task by mean: MRPC n=8 (91.0, 2 of 3 seeds), STS-B n=2 (91.0 beats n=4's 89.0).
    assert rows["MELoRA r=8 (best n)"] == ["73.7K", "91.0 ± 1.4 (n=8) [2/3]", "91.0 ± 1.0 (n=2)", "91.0", NOT_AVAILABLE]
    assert rows["MELoRA n=2 r=8"] == ["73.7K", "85.0 ± 0.0", "91.0 ± 1.0", "88.0", NOT_AVAILABLE]
    assert rows["MELoRA n=4 r=8"] == ["73.7K", "87.0 ± 1.0", "89.0 ± 0.0", "88.0", NOT_AVAILABLE]
    assert rows["MELoRA n=8 r=8"] == ["73.7K", "91.0 ± 1.4 [2/3]", "80.0 ± 0.0 [2/3]", "85.5", NOT_AVAILABLE]
    # r=1: 8× fewer parameters; no STS-B run, so no average.
    assert rows["MELoRA r=1 (best n)"] == ["9.2K", "81.0 ± 0.0 (n=2)", "—", "—", NOT_AVAILABLE]
    assert list(rows)[:6] == ["LoRA r=8", "DyLoRA r=8", "AdaLoRA r=8", "Delta-LoRA r=8", "MELoRA r=8 (best n)", "MELoRA r=1 (best n)"]


def test_failed_and_running_runs_are_listed_not_averaged(records, tmp_path):
    table = table2(records, profile="unit")
    assert len(table.excluded) == 2
    failed, running = sorted(table.excluded)
    assert failed.startswith("mrpc/minilm/melora_n8_r8/seed0: failed (loss is nan at step 3 (epoch 0))")
    assert running.startswith("stsb/minilm/melora_n8_r8/seed0: running")
    assert str(tmp_path / "unit" / "glue-stsb" / "minilm" / "melora_n8_r8" / "seed0") in running
    md = to_markdown(table)
    assert "**Runs not averaged (failed, incomplete or without a value):**" in md
    assert f"- {failed}" in md and f"- {running}" in md
    cell = next(r for r in table.rows if r.label == "MELoRA n=8 r=8").cells["stsb"]
    assert cell.values == [0.80, 0.80] and cell.seeds == [1, 2]  # the running run's 0.95 is not in


def test_caption_states_model_data_seeds_hardware_and_dates(records):
    cap = table2(records, profile="unit").caption
    assert "Model: minilm (org/minilm); profile unit." in cap
    assert "Data (examples): MRPC train 2000, dev 400; STS-B train 2000, dev 400." in cap
    assert "Seeds: 0–2 (3 per cell at most)." in cap
    assert "accuracy (MRPC); Pearson corr. (STS-B)" in cap and "×100" in cap
    assert "Hardware: Test CPU (2 cores, 2 torch threads)." in cap
    assert "Runs dated 2026-09-21 to 2026-09-23; table generated" in cap


def test_mixed_models_need_a_choice(records, tmp_path):
    other = fake_record(tmp_path, "mrpc", "lora_r8", 0, 0.5, model="mpnet-base")
    other["run_dir"] = "x"
    with pytest.raises(ValueError, match=r"2 models \['minilm', 'mpnet-base'\].*--model"):
        table2(records + [other], profile="unit")
    assert table2(records + [other], model="mpnet-base", profile="unit").rows[0].cells["mrpc"].values == [0.5]


def test_rows_come_from_the_method_config_not_the_tag(tmp_path):
    # A tag is a folder name: a run tagged "my_run" with MELoRA n=2 r=8's config is that row's run,
    # and a run tagged like LoRA r=8 but configured with another scaling is not LoRA r=8's.
    fake_record(tmp_path, "mrpc", "melora_n2_r8", 0, 0.61, method_tag="my_run",
                method_config={"method": "melora", "n": 2, "r": 8, "alpha": 16})
    fake_record(tmp_path, "mrpc", "lora_r8", 0, 0.99,
                method_config={"method": "lora", "n": 1, "r": 8, "alpha": 16, "scaling": "rslora"})
    rows = {r.label: r for r in table2(load_records(tmp_path), profile="unit").rows}
    assert rows["MELoRA n=2 r=8"].cells["mrpc"].values == [0.61]
    assert rows["LoRA r=8"].cells["mrpc"].values == []


def test_table4_groups_by_equivalent_rank(tmp_path):
    for seed, (a, b) in enumerate([(0.70, 0.72), (0.74, 0.76)]):
        fake_record(tmp_path, "mrpc", "lora_r4", seed, a)
        fake_record(tmp_path, "mrpc", "melora_n2_r2", seed, b)
    table = table4(load_records(tmp_path))
    md = to_markdown(table)
    assert "| R | Method | Params | MRPC | Avg | Paper |" in md
    assert f"| R=4 | LoRA r=4 | 36.9K | 72.0 ± 2.8 | 72.0 | {NOT_AVAILABLE} |" in md
    assert f"| R=4 | MELoRA n=2 r=2 | 18.4K | 74.0 ± 2.8 | 74.0 | {NOT_AVAILABLE} |" in md
    assert f"| R=16 | MELoRA n=2 r=8 | — | — | — | {NOT_AVAILABLE} |" in md
    assert [r.spec.group for r in table.rows] == ["R=4", "R=4", "R=8", "R=8", "R=16", "R=16"]


def test_csv_holds_numbers_in_printed_units(records):
    rows = list(csv.DictReader(io.StringIO(to_csv(table2(records, profile="unit")))))
    best = next(r for r in rows if r["method"] == "MELoRA r=8 (best n)")
    assert (best["MRPC"], best["MRPC std"], best["MRPC seeds"], best["MRPC pick"]) == ("91.0", "1.4142", "2", "MELoRA n=8 r=8")
    assert (best["STS-B"], best["STS-B pick"], best["avg"], best["params"]) == ("91.0", "MELoRA n=2 r=8", "91.0", "73728")
    lora = next(r for r in rows if r["method"] == "LoRA r=8")
    assert (lora["MRPC"], lora["MRPC std"], lora["paper"]) == ("82.0", "2.0", NOT_AVAILABLE)


def test_latex_and_files(records, tmp_path):
    table = table2(records, profile="unit")
    tex = to_latex(table)
    assert r"\begin{tabular}{lrrrrl}" in tex and r"\label{tab:table2}" in tex
    assert r"91.0 $\pm$ 1.4 (n=8) [2/3]" in tex and "2 runs not averaged" in tex
    assert "% not averaged: mrpc/minilm/melora_n8_r8/seed0: failed" in tex
    paths = write_table(table, tmp_path / "tables")
    assert [p.name for p in paths] == ["table2.md", "table2.csv", "table2.tex"] and all(p.stat().st_size for p in paths)


def instruct_runs(root: Path) -> list[dict]:
    """Training records (dev loss) and INSTRUCTEVAL records laid out as melora.experiments.instruct / melora.experiments.instructeval write them."""
    scores = {"lora_r8": (1.20, 0.40, 0.30, 0.20, 0.10), "lora_r64": (1.10, 0.44, 0.32, 0.24, 0.12),
              "melora_n8_r1": (1.05, 0.46, 0.34, 0.26, 0.14), "melora_n16_r1": (1.00, 0.50, 0.50, 0.50, 0.50)}

    def evaluation(tag, values, status="completed", finished_at=2.0):
        mmlu, bbh, drop, he = values
        return {"kind": "instructeval", "status": status, "model": "minilm", "finished_at": finished_at,
                "adapter": {"dir": "elsewhere", "training": {"profile": "unit", "method_tag": tag, "seed": 0}},
                "scores": {"mmlu": mmlu, "bbh": bbh, "drop": drop, "humaneval": he},
                "results": {"mmlu": {"n_examples": 570}, "bbh": {"n_examples": 270}, "drop": {"n_examples": 100}, "humaneval": {"n_examples": 164}}}

    for tag, (loss, *values) in scores.items():
        fake_record(root, "alpaca", tag, 0, loss, kind="instruct", train_size=50_000, eval_sizes={"validation": 2000},
                    dev_loss_at_start=2.5, wall_time_s=300.0)
        status = "running" if tag == "melora_n16_r1" else "completed"
        folder = root / "unit" / "instructeval" / "minilm" / f"{tag}-seed0"
        if tag == "lora_r8":  # an evaluation written into the training run's own folder
            folder = root / "unit" / "instruct-alpaca" / "minilm" / tag / "seed0"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval_record.json").write_text(json.dumps(evaluation(tag, values, status)))
    stale = root / "unit" / "instructeval" / "minilm" / "lora_r64-seed0-old"  # an older evaluation of the same adapter
    stale.mkdir(parents=True)
    (stale / "eval_record.json").write_text(json.dumps(evaluation("lora_r64", (0.9, 0.9, 0.9, 0.9), finished_at=1.0)))
    return load_records(root)


def test_table3_best_by_dev_loss_and_benchmarks(tmp_path):
    table = table3(instruct_runs(tmp_path))
    assert [c.label for c in table.columns] == ["MMLU", "BBH", "DROP", "HumanEval", "Dev loss"]
    rows = rows_of(to_markdown(table))
    assert rows["LoRA (best r by dev loss): r=64"][:7] == ["589.8K", "44.0", "32.0", "24.0", "12.0", "1.100", "28.0"]
    assert rows["LoRA r=8"][:7] == ["73.7K", "40.0", "30.0", "20.0", "10.0", "1.200", "25.0"]
    # n=16 has the lowest dev loss but its evaluation is unfinished: picked, benchmark cells empty, listed.
    assert rows["MELoRA r=1 (best n by dev loss): n=16"][:7] == ["9.2K", "—", "—", "—", "—", "1.000", "—"]
    assert rows["MELoRA n=8 r=1"][:7] == ["9.2K", "46.0", "34.0", "26.0", "14.0", "1.050", "30.0"]
    assert rows["LoRA r=256"][1] == "—"
    note = f"(evaluation running in {tmp_path / 'unit' / 'instructeval' / 'minilm' / 'melora_n16_r1-seed0'})"
    assert [e.split(" [")[0] for e in table.excluded] == [
        f"alpaca/minilm/melora_n16_r1/seed0: completed, but has no MMLU, BBH, DROP, HumanEval value {note}"]
    assert "Alpaca train 50000, dev 2000" in table.caption and "MMLU 570 test examples" in table.caption


def add_base_evaluations(root: Path) -> None:
    """The base model's INSTRUCTEVAL as the sweep writes it (no adapter), plus an older one it supersedes."""
    for name, scores, finished in (("base", (0.2, 0.1, 0.1, 0.0), 5.0), ("base-old", (0.9, 0.9, 0.9, 0.9), 1.0)):
        folder = root / "unit" / "instructeval" / "minilm" / name
        folder.mkdir(parents=True)
        (folder / "eval_record.json").write_text(json.dumps({
            "kind": "instructeval", "status": "completed", "profile": "unit", "model": "minilm", "adapter": None,
            "finished_at": finished, "wall_time_s": 120.0, "device": {"cpu": "Test CPU", "cpu_count": 2, "torch_threads": 1},
            "scores": dict(zip(("mmlu", "bbh", "drop", "humaneval"), scores)),
            "results": {"mmlu": {"n_examples": 570}, "bbh": {"n_examples": 270}, "drop": {"n_examples": 100}, "humaneval": {"n_examples": 164}}}))
        (folder / "config.yaml").write_text("adapter_dir: null\n")


def test_base_model_row_in_tables_3_and_5(tmp_path):
    instruct_runs(tmp_path)
    add_base_evaluations(tmp_path)
    records = load_records(tmp_path)
    base = [r for r in records if r["method_tag"] == "base"]
    assert len(base) == 1 and base[0]["seed"] is None and base[0]["best_metric"] == 2.5  # the training runs' start loss
    for table in (table3(records), table5(records)):
        assert table.rows[0].spec.label == "Base model (no adapter)"
        line = next(l for l in to_markdown(table).splitlines() if "| Base model (no adapter) |" in l)
        # params 0; scores ×100 of the newest base evaluation; dev loss before training; avg of the four.
        assert [c.strip() for c in line.strip("|").split("|")][-8:-1] == ["0", "20.0", "10.0", "10.0", "0.0", "2.500", "10.0"]
        assert "Base model: the pretrained model without adapter" in to_markdown(table)
    # Training and evaluation time: 4 × 300 s of training, 3 finished evaluations of trained runs (lora_r64's
    # newest, finished_at 2.0, has no wall time) and the base's 120 s.
    assert "Run time (training and evaluation): 22 min summed over 5 runs" in table3(records).caption


def test_export_leaves_out_runs_in_progress(tmp_path):
    from melora.experiments.report.export import export_runs

    runs = tmp_path / "runs"
    fake_record(runs, "mrpc", "lora_r8", 0, 0.7)
    fake_record(runs, "mrpc", "lora_r8", 1, 0.7, status="failed")
    fake_record(runs, "mrpc", "lora_r8", 2, None, status="running")  # training now, or killed before it finished
    assert export_runs(runs, tmp_path / "out", log=lambda message: None) == 2
    exported = sorted(p.parent.name for p in (tmp_path / "out").rglob("record.json"))
    assert exported == ["seed0", "seed1"]


def test_export_keeps_evaluations_and_the_base_model(tmp_path):
    from melora.experiments.report.export import export_runs

    runs = tmp_path / "runs"
    instruct_runs(runs)
    add_base_evaluations(runs)
    assert export_runs(runs, tmp_path / "out", log=lambda message: None) == 4
    exported = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("eval_record.json")}
    assert "unit/instructeval/minilm/base/eval_record.json" in exported and "unit/instructeval/minilm/melora_n8_r1-seed0/eval_record.json" in exported
    assert rows_of(to_markdown(table3(load_records(tmp_path / "out")))) == rows_of(to_markdown(table3(load_records(runs))))
