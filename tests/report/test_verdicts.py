"""The dev-halves report: choices on the validation half only, test-half verdicts, lr curves, longer training, files."""

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
from scipy import stats

from melora.experiments.report import verdicts
from melora.experiments.report.protocol import edge_text, grid_text, to_csv, to_markdown
from melora.experiments.report.verdicts import BEST_OF_N, TABLE2_VERDICTS, TABLE4_VERDICTS, build, curves, dominance, long_rows

ROOT = Path(__file__).resolve().parents[2]
LRS = (1e-3, 3e-3, 1e-2)
# (method config, validation optimum in log10 lr, level): every Table 2 and Table 4 setting of the verdicts specs.
SETTINGS = {
    "lora_r8": ({"method": "lora", "n": 1, "r": 8}, -2.5, 0.80),
    "melora_n2_r8": ({"method": "melora", "n": 2, "r": 8}, -2.5, 0.81),
    "melora_n2_r1": ({"method": "melora", "n": 2, "r": 1}, -2.2, 0.79),
    "melora_n4_r1": ({"method": "melora", "n": 4, "r": 1}, -2.0, 0.80),
    "melora_n8_r1": ({"method": "melora", "n": 8, "r": 1}, -1.8, 0.82),
    "dylora_r8": ({"method": "dylora", "r": 8}, -2.5, 0.78),
    "adalora_r8": ({"method": "adalora", "target_r": 8}, -2.5, 0.77),
    "delta_lora_r8": ({"method": "delta_lora", "r": 8}, -2.5, 0.79),
    "lora_r4": ({"method": "lora", "n": 1, "r": 4}, -2.5, 0.79),
    "lora_r16": ({"method": "lora", "n": 1, "r": 16}, -2.5, 0.81),
    "melora_n2_r2": ({"method": "melora", "n": 2, "r": 2}, -2.5, 0.80),
    "melora_n2_r4": ({"method": "melora", "n": 2, "r": 4}, -2.5, 0.80),
}
METRICS = {"sst2": "accuracy", "stsb": "pearson", "mrpc": "accuracy", "cola": "matthews_correlation"}


def record(task, tag, lr, seed, val, test, epochs=2, diverged=False, model="minilm"):
    """A dev-halves record.json as melora.experiments.glue writes it (the fields the report reads); ``diverged``: the loss became non-finite."""
    mc, metric = dict(SETTINGS[tag][0]), METRICS[task]
    out = {"name": f"{task}/{tag}/lr{lr:g}/ep{epochs}/seed{seed}", "kind": "glue", "profile": "mini", "task": task, "metric": metric,
           "model": model, "seed": seed, "method_config": mc, "config": {"task": {"lr": lr, "epochs": epochs}, "model": {"name": model}},
           "selection": {"split": "dev_halves", "seed": 20240227, "validation_size": 436, "test_size": 436},
           "selection_metric": f"val_{metric}", "train_size": 4000, "eval_sizes": {"validation": 872, "val": 436, "test": 436},
           "device": {"cpu": "Test CPU"}}
    if diverged:
        return out | {"status": "failed", "diverged": True, "error": "loss is nan"}
    return out | {"status": "completed", "best_metric": val,
                  "best_metrics": {metric: (val + test) / 2, f"val_{metric}": val, f"test_{metric}": test}}


def grid(tasks=("sst2", "stsb"), seeds=range(3), tags=tuple(SETTINGS), lrs=LRS, epochs=2, test_shift=0.5):
    """Every setting at every lr and seed: validation peaks at the setting's optimum, the test half ``test_shift`` decades higher."""
    noise = random.Random(7)
    out = []
    for task in tasks:
        for tag in tags:
            _, optimum, level = SETTINGS[tag]
            for lr in lrs:
                for seed in seeds:
                    x = math.log10(lr)
                    val = level - 0.05 * (x - optimum) ** 2 + noise.uniform(-0.004, 0.004)
                    test = level - 0.05 * (x - optimum - test_shift) ** 2 + noise.uniform(-0.01, 0.01)
                    out.append(record(task, tag, lr, seed, val, test, epochs))
    return out


def choices(table):
    return {(row, task): (c.setting, c.lr) for row, by_task in table.rows.items() for task, c in by_task.items()}


def test_choices_read_the_validation_half_only():
    """Negating every test-half value (and the whole-dev value) changes no chosen lr, no chosen n, no chosen curve point."""
    records = grid()
    flipped = [r | {"best_metrics": {k: -v if not k.startswith("val_") else v for k, v in r["best_metrics"].items()}} for r in records]
    for layout in (TABLE2_VERDICTS, TABLE4_VERDICTS):
        table, again = build(records, layout), build(flipped, layout)
        assert choices(table) == choices(again) and len(choices(table)) == 2 * len(layout.rows)
        assert table.rows["LoRA r=8"]["sst2"].reported.values == [-v for v in again.rows["LoRA r=8"]["sst2"].reported.values]
    for task in ("sst2", "stsb"):
        assert {k: c.chosen for k, c in curves(records, task).items()} == {k: c.chosen for k, c in curves(flipped, task).items()}
    table = build(records)
    # validation peaks at 10^-2.5 for LoRA (3e-3 is nearest), at 10^-1.8 for n=8 (1e-2); MELoRA r=1 picks the highest level: n=8
    assert table.rows["LoRA r=8"]["sst2"].lr == 3e-3 and table.rows[BEST_OF_N]["sst2"].setting == "n=8"
    assert table.rows[BEST_OF_N]["sst2"].lr == 1e-2


def test_ties_go_to_the_smaller_lr_and_flat_grids_say_so():
    records = [record("mrpc", "lora_r8", lr, seed, 0.68, 0.60 + lr) for lr in LRS for seed in range(3)]  # the majority class
    c = build(records).rows["LoRA r=8"]["mrpc"]
    assert c.lr == 1e-3 and c.bracket.status == "flat" and edge_text(c) == "bottom: flat"


def test_diverged_and_undefined_runs_rank_lowest():
    records = [record("stsb", "lora_r8", lr, seed, val, 0.8) for lr, val in ((1e-3, 0.70), (3e-3, 0.75), (1e-2, 0.90)) for seed in range(3)]
    records[-1] = record("stsb", "lora_r8", 1e-2, 2, None, None, diverged=True)  # one seed of the best lr diverged
    c = build(records).rows["LoRA r=8"]["stsb"]
    assert c.lr == 3e-3 and c.bracket.means[1e-2] == -math.inf and grid_text(c) == "1e-3, 3e-3, 1e-2 (collapsed)"
    nan = [record("stsb", "lora_r8", 1e-2, s, float("nan") if s == 0 else 0.95, 0.8) for s in range(3)]  # constant predictions
    assert build(records[:-3] + nan).rows["LoRA r=8"]["stsb"].lr == 3e-3
    point = curves(records, "stsb")["LoRA r=8"].points[1e-2][1]
    assert point.n == 3 and math.isnan(point.mean)
    only_diverged = [record("stsb", "lora_r8", lr, 0, None, None, diverged=True) for lr in LRS]
    assert build(only_diverged).rows["LoRA r=8"]["stsb"].versus_reference is None  # collapsed everywhere: still a row, no crash


def test_means_are_over_the_seeds_every_lr_has():
    """Seeds 1-4 finished at 1e-3 only: the lrs are compared on seed 0, where 3e-3 wins."""
    records = [record("sst2", "lora_r8", 1e-3, 0, 0.80, 0.7), record("sst2", "lora_r8", 3e-3, 0, 0.82, 0.7),
               record("sst2", "lora_r8", 1e-2, 0, 0.70, 0.7)]
    records += [record("sst2", "lora_r8", 1e-3, seed, 0.95, 0.7) for seed in range(1, 5)]
    c = build(records).rows["LoRA r=8"]["sst2"]
    assert c.lr == 3e-3 and c.bracket.seeds == (0,) and c.reported.n == 1


def test_edge_flags_carry_the_brackets_reason():
    top = [record("sst2", "lora_r8", lr, s, val, 0.8) for lr, val in zip(LRS, (0.70, 0.75, 0.80)) for s in range(2)]
    limit = [record("stsb", "lora_r8", lr, s, val, 0.8) for lr, val in ((0.03, 0.7), (0.1, 0.75), (0.3, 0.8)) for s in range(2)]
    table = build(top + limit)
    extending, at_limit = table.rows["LoRA r=8"]["sst2"], table.rows["LoRA r=8"]["stsb"]
    assert edge_text(extending) == "top: still being extended" and "being extended" in extending.bracket.reason
    assert edge_text(at_limit) == "top: grid limit" and "grid limit" in at_limit.bracket.reason
    csv = to_csv(table).splitlines()
    assert csv[0].startswith("method,task,chosen,lr,lr at grid edge,lrs tried,seeds,validation,test mean ± std,test 95% CI")
    assert csv[1].startswith('LoRA r=8,SST-2,-,1e-2,top: still being extended,"1e-3, 3e-3, 1e-2",2,')
    assert csv[2].startswith('LoRA r=8,STS-B,-,3e-1,top: grid limit,"3e-2, 1e-1, 3e-1",2,')


def test_test_cells_and_paired_differences_match_scipy():
    table = build(grid(seeds=range(5)))
    mel, lora = table.rows[BEST_OF_N]["stsb"], table.rows["LoRA r=8"]["stsb"]
    test = mel.reported.values
    half = stats.t.ppf(0.975, len(test) - 1) * stats.tstd(test) / math.sqrt(len(test))
    assert mel.reported.ci95 == pytest.approx((sum(test) / 5 - half, sum(test) / 5 + half))
    ref = stats.ttest_rel(mel.reported.values, lora.reported.values).confidence_interval(0.95)
    d = mel.versus_reference
    assert d.seeds == [0, 1, 2, 3, 4] and d.ci == pytest.approx((ref.low, ref.high))
    assert d.verdict == ("better" if ref.low > 0 else "worse" if ref.high < 0 else "no detectable difference")
    # Table 4: each MELoRA n=2 r=R/2 against LoRA at the same equivalent rank R
    t4 = build(grid(seeds=range(5)), TABLE4_VERDICTS)
    for melora_row, lora_row in TABLE4_VERDICTS.references.items():
        a, b = t4.rows[melora_row]["sst2"].reported.values, t4.rows[lora_row]["sst2"].reported.values
        assert t4.rows[melora_row]["sst2"].versus_reference.ci == pytest.approx(tuple(stats.ttest_rel(a, b).confidence_interval(0.95)))


def test_the_best_of_n_row_is_the_per_n_row_of_its_n():
    table = build(grid())
    assert list(table.rows) == list(TABLE2_VERDICTS.rows)
    for task in ("sst2", "stsb"):
        best = table.rows[BEST_OF_N][task]
        alone = table.rows[f"MELoRA {best.setting} r=1"][task]
        assert (best.lr, best.setting, best.reported.values, best.grid) == (alone.lr, alone.setting, alone.reported.values, alone.grid)
        assert best.versus_reference.ci == alone.versus_reference.ci
        assert best.candidates == 9 and alone.candidates == 3  # three n x three lrs; one n x three lrs
    body = to_markdown(table)
    assert "| MELoRA n=4 r=1 | SST-2 | n=4 |" in body and "| MELoRA r=1 | SST-2 | n=8 |" in body


def test_lr_figure_marks_the_chosen_lr_on_a_log_axis(tmp_path):
    from melora.experiments.report.figures import save_figure

    records = grid(tasks=("sst2",))
    records += [record("sst2", "melora_n8_r1", 3e-2, s, None, None, diverged=True) for s in range(3)]
    lines = curves(records, "sst2")
    fig = verdicts.lr_figure(lines, "sst2", "accuracy")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "test-half accuracy ×100"
    marks = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
    chosen = build(records).rows
    assert list(marks["chosen:LoRA r=8"].get_xdata()) == [chosen["LoRA r=8"]["sst2"].lr]
    assert marks["chosen:MELoRA n=8 r=1"].get_marker() == "*"  # also the best-of-n choice
    assert list(marks["collapsed:MELoRA n=8 r=1"].get_xdata()) == [3e-2]
    assert {label for label in lines} == {"LoRA r=8", "MELoRA n=2 r=8", "MELoRA n=2 r=1", "MELoRA n=4 r=1", "MELoRA n=8 r=1",
                                          "DyLoRA r=8", "AdaLoRA r=8", "Delta-LoRA r=8"}
    dashed = [line for line in ax.get_lines() if line.get_label() == "DyLoRA r=8"]
    assert dashed and dashed[0].get_linestyle() == "--"
    assert all(p.stat().st_size > 1000 for p in save_figure(fig, tmp_path, "lr_sensitivity_sst2"))


def test_dominance_says_above_below_or_crosses():
    records = []
    for seed in range(2):
        for lr, lora, above, crossing in ((1e-3, 0.70, 0.72, 0.75), (3e-3, 0.75, 0.76, 0.70), (1e-2, 0.72, 0.80, 0.73)):
            records += [record("mrpc", "lora_r8", lr, seed, 0.7, lora), record("mrpc", "melora_n2_r8", lr, seed, 0.7, above),
                        record("mrpc", "melora_n4_r1", lr, seed, 0.7, crossing)]
    assert dominance(records, "mrpc", "MELoRA n=2 r=8", "LoRA r=8") == "above at every lr"
    assert dominance(records, "mrpc", "LoRA r=8", "MELoRA n=2 r=8") == "below at every lr"
    assert dominance(records, "mrpc", "MELoRA n=4 r=1", "LoRA r=8") == "crosses"
    assert dominance(records, "mrpc", "MELoRA n=8 r=1", "LoRA r=8") == "no common lr"
    level = [record("mrpc", "melora_n2_r1", lr, seed, 0.7, {1e-3: 0.70, 3e-3: 0.74, 1e-2: 0.72}[lr])
             for seed in range(2) for lr in (1e-3, 3e-3, 1e-2)]
    lines = curves(records + level, "mrpc")
    assert verdicts.signs(lines["MELoRA n=2 r=1"], lines["LoRA r=8"]) == {1e-3: 0, 3e-3: -1, 1e-2: 0}
    assert "MELoRA n=2 r=1 crosses LoRA r=8 (level at 1e-3; below at 3e-3; level at 1e-2)" in verdicts.dominance_text(lines)
    assert verdicts.dominance_text(curves(records, "mrpc")) == ("MELoRA n=2 r=8 above LoRA r=8 at every lr; "
                                                                "MELoRA n=4 r=1 crosses LoRA r=8 (above at 1e-3; below at 3e-3; above at 1e-2)")


def test_lr_table_has_every_point_and_marks_the_choices():
    figures, markdown, csv, summary = verdicts.lr_sensitivity(grid(tasks=("sst2",)))
    lines = csv.splitlines()
    assert list(figures) == ["sst2"] and len(lines) == 1 + 8 * 3  # eight lines, three lrs each
    assert lines[0] == "task,row,setting,lr,seeds,collapsed seeds,validation,test mean ± std,test 95% CI,chosen"
    chosen = [line for line in lines if line.endswith(",yes") or line.endswith(",yes (best n)")]
    assert len(chosen) == 8 and sum(line.endswith("(best n)") for line in chosen) == 1
    assert "MELoRA n=8 r=1" in next(line for line in chosen if line.endswith("(best n)"))
    assert "SST-2: MELoRA n=2 r=8" in markdown
    bullets = [line for line in summary.splitlines() if line.startswith("- ")]
    assert len(bullets) == 1 and bullets[0].startswith("- SST-2: MELoRA n=2 r=8 ") and bullets[0] in markdown.replace(" SST-2:", "\n- SST-2:")


def test_long_training_beside_the_default_epochs():
    records = grid(seeds=range(3))
    assert long_rows(records) is None  # no run trained for 3x the epochs
    # 6 epochs: LoRA r=8 and the n chosen at 2 epochs (n=8) at one lr each; another n at 6 epochs must not be used
    records += [record(task, tag, 3e-3, seed, 0.8, 0.8 + 0.01 * seed + (0.02 if tag == "melora_n8_r1" else 0), epochs=6)
                for task in ("sst2", "stsb") for tag in ("lora_r8", "melora_n8_r1", "melora_n2_r1") for seed in range(3)]
    header, body = long_rows(records)
    assert header[:4] == ["task", "method", "epochs", "chosen"]
    assert [line[:4] for line in body[:4]] == [["SST-2", "LoRA r=8", "2", "-"], ["SST-2", "MELoRA r=1", "2", "n=8"],
                                               ["SST-2", "LoRA r=8", "6", "-"], ["SST-2", "MELoRA n=8 r=1", "6", "n=8"]]
    assert body[3][header.index("Δ vs LoRA r=8 (paired)")] == "+2.0" and body[3][-1] == "better"
    assert body[2][-1] == "reference" and len(body) == 8
    default = build(records)  # the long runs never enter the default-epochs table
    assert default.rows["LoRA r=8"]["sst2"].reported.n == 3 and default.rows["LoRA r=8"]["sst2"].grid == LRS


def test_notes_state_protocol_rule_intervals_and_budget():
    text = verdicts.note(TABLE2_VERDICTS)
    for words in ("whole training subset", "validation half", "never used to choose", "the smaller lr", "ranks below every other",
                  "training randomness", "not the sampling of test data", "three chances", "MELoRA n=2 r=1, MELoRA n=4 r=1"):
        assert words in text
    assert "then MELoRA's n" in text and "each row's lr" in verdicts.note(TABLE4_VERDICTS)
    for generated in (text, verdicts.note(TABLE4_VERDICTS), verdicts.LR_NOTE, verdicts.long_note()):
        assert "issue" not in generated.lower()


def write_runs(root: Path, records: list[dict], prefix: str = "run") -> Path:
    """Each record as ``<root>/mini/devhalves/<prefix><i>/record.json``; returns the runs folder ``<root>/mini``."""
    for i, r in enumerate(records):
        folder = root / "mini" / "devhalves" / f"{prefix}{i}"
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(json.dumps(r))
    return root / "mini"


def test_make_results_writes_the_dev_halves_report_and_skips_the_long_table(tmp_path):
    from melora.experiments.report import make_results

    runs = write_runs(tmp_path / "runs", grid(seeds=range(2)) + [record("sst2", "lora_r8", 3e-2, 0, None, None, diverged=True)])
    messages = []
    written = make_results(runs, tmp_path / "out", only=["verdicts"], log=messages.append)
    tables, figures = tmp_path / "out" / "tables", tmp_path / "out" / "figures"
    for name in ("table2_verdicts", "table4_verdicts"):
        assert all((tables / f"{name}.{ext}").is_file() for ext in ("md", "csv", "tex"))
        assert all((figures / f"{name}_forest.{ext}").is_file() for ext in ("png", "pdf"))
    assert all((figures / f"lr_sensitivity_{task}.png").is_file() for task in ("sst2", "stsb"))
    assert (tables / "lr_sensitivity.md").is_file() and (tables / "lr_sensitivity.csv").is_file()
    assert not (tables / "verdicts_long.md").exists() and any(m.startswith("verdicts_long: no run") for m in messages)
    assert "table2_verdicts" in written and not (tables / "table2_heldout.md").exists()
    md = (tables / "table2_verdicts.md").read_text()
    assert "Data (examples): SST-2 train 4000, validation half 436, test half 436, 2 epochs" in md and "Seeds: 0, 1." in md
    assert "Model: minilm" in md and "Diverged runs (ranked lowest): 1." in md
    for path in tables.iterdir():
        assert "issue" not in path.read_text().lower()

    tags = ("lora_r8", "melora_n8_r1")  # n=8: the n chosen at the default epochs
    write_runs(tmp_path / "runs", [record(t, tag, 3e-3, s, 0.8, 0.8, epochs=6) for t in ("sst2", "stsb") for tag in tags for s in range(2)],
               prefix="long")
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--only", "verdicts"]) == 0
    long = (tables / "verdicts_long.md").read_text()
    assert "| STS-B | MELoRA n=8 r=1 | 6 | n=8 | 3e-3 |" in long and "Longer training" in long


def test_several_models_need_a_choice(tmp_path):
    from melora.experiments.report import make_results

    runs = write_runs(tmp_path / "runs", grid(tasks=("sst2",), seeds=[0], tags=("lora_r8",))
                      + [record("sst2", "lora_r8", 1e-3, 0, 0.8, 0.8, model="mpnet")])
    with pytest.raises(ValueError, match="model"):
        make_results(runs, tmp_path / "out", only=["verdicts"], log=lambda message: None)
    written = make_results(runs, tmp_path / "out", only=["verdicts"], model="mpnet", log=lambda message: None)
    assert "table2_verdicts" in written


@pytest.mark.skipif(not (ROOT / "results" / "runs" / "mini" / "heldout").is_dir(), reason="no committed held-out records")
def test_heldout_tables_are_unchanged(tmp_path):
    """The committed held-out tables are what the shared protocol code writes from the committed records, byte for byte."""
    from melora.experiments.report.build import _heldout_table
    from melora.experiments.report.records import load_records

    written = _heldout_table(load_records(ROOT / "results" / "runs" / "mini"), tmp_path / "tables", None, lambda message: None)
    tables = [p for paths in written.values() for p in paths if p.suffix in (".md", ".csv", ".tex")]
    assert len(tables) == 12  # table2, table4 (md, csv, tex each), their lr sensitivity (md, csv each), the selection signal (md, csv)
    for path in tables:
        assert path.read_bytes() == (ROOT / "results" / "tables" / path.name).read_bytes(), path.name


def test_selection_signal_shows_what_validation_picks_and_never_reads_test_to_pick():
    import csv
    import io

    records = grid(tasks=("sst2",))
    markdown, table = verdicts.selection_signal(records)
    rows = list(csv.DictReader(io.StringIO(table)))
    lines = verdicts.curves(records, "sst2")
    assert [r["line"] for r in rows] == list(lines)  # one row per Table 2 line
    for r in rows:
        chosen = lines[r["line"]].chosen
        assert chosen is None or r["validation picks"] == verdicts.lr_text(chosen)  # the lr the table chose
        assert r["seeds"] == "3" and r["margin s.e."] != "—"
    lora = next(r for r in rows if r["line"] == "LoRA r=8")
    assert (lora["validation picks"], lora["test would pick"]) == ("3e-3", "1e-2")  # the test half peaks half a decade higher
    flipped = [dict(r, best_metrics={**r["best_metrics"], f"test_{r['metric']}": -r["best_metrics"][f"test_{r['metric']}"]})
               if r.get("status") == "completed" else r for r in records]
    again = list(csv.DictReader(io.StringIO(verdicts.selection_signal(flipped)[1])))
    assert [r["validation picks"] for r in again] == [r["validation picks"] for r in rows]
    assert "ranks first the lr the test half ranks first in" in markdown
    assert verdicts.selection_signal([record("sst2", "lora_r8", 1e-3, 0, 0.8, 0.8)]) is None  # one lr: nothing to rank
