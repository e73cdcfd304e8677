"""The held-out Table 2: lr and n are chosen on validation only; dev is reported with paired verdicts."""

import pytest
from scipy import stats

from melora.experiments.report.protocol import build, row_of, to_csv, to_markdown


def record(task, method, lr, seed, val, dev, n=1, r=8, status="completed"):
    mc = {"method": method, "r": r, "n": n} if method != "adalora" else {"method": method, "target_r": r}
    return {"kind": "glue", "task": task, "metric": "accuracy", "status": status, "seed": seed, "name": f"{method}{n}-{lr}-{seed}",
            "selection": {"split": "heldout"}, "method_config": mc, "config": {"task": {"lr": lr}},
            "best_metric": val, "best_metrics": {"accuracy": dev, "heldout_accuracy": val}}


def test_row_names_come_from_the_method_config():
    assert row_of({"method": "melora", "n": 8, "r": 1}) == "MELoRA r=1"
    assert row_of({"method": "adalora", "target_r": 8}) == "AdaLoRA r=8"
    assert row_of({"method": "lora", "n": 1, "r": 8}) == "LoRA r=8"
    assert row_of({"method": "melora", "n": 8, "r": 1, "scaling": "equivalent"}) == "MELoRA r=1 (equivalent)"


def test_choice_uses_validation_never_dev():
    records = []
    for seed in range(3):
        # lr 1e-3 is best on validation, 3e-3 would be best on dev: the table must take 1e-3.
        records += [record("sst2", "lora", 1e-3, seed, 0.80, 0.70 + seed / 100), record("sst2", "lora", 3e-3, seed, 0.75, 0.90)]
        # MELoRA: n=8 wins on validation at its best lr (3e-3); n=2 has the best dev.
        records += [record("sst2", "melora", 3e-3, seed, 0.82, 0.71 + seed / 50, n=8, r=1),
                    record("sst2", "melora", 1e-3, seed, 0.60, 0.99, n=8, r=1),
                    record("sst2", "melora", 1e-3, seed, 0.81, 0.99, n=2, r=1)]
    table = build(records)
    lora, mel = table.rows["LoRA r=8"]["sst2"], table.rows["MELoRA r=1"]["sst2"]
    assert (lora.lr, lora.setting, lora.candidates) == (1e-3, "-", 2)
    assert (mel.lr, mel.setting, mel.candidates) == (3e-3, "n=8", 3)
    assert mel.dev.values == pytest.approx([71.0, 73.0, 75.0])
    lora_dev, mel_dev = [70.0, 71.0, 72.0], [71.0, 73.0, 75.0]
    ref = stats.ttest_rel(mel_dev, lora_dev).confidence_interval(0.95)
    assert mel.versus_reference.ci == pytest.approx((ref.low, ref.high))
    assert mel.versus_reference.verdict == "no detectable difference"  # mean +2, but the CI spans 0


def test_dev_selected_and_failed_runs_are_kept_apart():
    records = [record("mrpc", "lora", 1e-3, 0, 0.7, 0.7), record("mrpc", "lora", 3e-3, 0, 0.9, 0.9, status="failed")]
    records.append(dict(record("mrpc", "lora", 3e-4, 0, 0.99, 0.99), selection={"split": "dev"}))
    table = build(records)
    assert table.rows["LoRA r=8"]["mrpc"].lr == 1e-3 and table.failed == ["lora1-0.003-0"]
    md, csv = to_markdown(table), to_csv(table)
    assert "Failed runs: lora1-0.003-0" in md and csv.splitlines()[1].startswith("LoRA r=8,MRPC,-,0.001,—,1")


def test_forest_plot_draws_one_line_per_paired_cell(tmp_path):
    from melora.experiments.report.figures import save_figure
    from melora.experiments.report.protocol import forest_plot

    records = [record("sst2", m, 1e-3, s, 0.8, 0.8 + d + s / 100, n=n, r=r)
               for s in range(3) for m, n, r, d in (("lora", 1, 8, 0.0), ("melora", 8, 1, -0.02), ("melora", 2, 8, 0.0))]
    fig = forest_plot(build(records))
    assert len(fig.axes[0].get_yticklabels()) == 2
    assert all(p.is_file() for p in save_figure(fig, tmp_path, "verdicts"))
    assert forest_plot(build([record("sst2", "lora", 1e-3, 0, 0.8, 0.8)])) is None


def test_seeds_added_at_the_chosen_lr_do_not_move_the_choice():
    """The grid ran seed 0 at every lr; seeds 1-4 ran at the lr it chose. Means are compared on seed 0 only."""
    records = [record("sst2", "lora", 1e-3, 0, 0.80, 0.70), record("sst2", "lora", 3e-3, 0, 0.78, 0.90)]
    records += [record("sst2", "lora", 1e-3, seed, 0.70, 0.71) for seed in range(1, 5)]  # a 5-seed mean of 0.72 < 0.78
    choice = build(records).rows["LoRA r=8"]["sst2"]
    assert (choice.lr, choice.dev.n, choice.lrs_tried) == (1e-3, 5, 2)


def test_table4_pairs_each_melora_row_with_lora_at_its_equivalent_rank():
    from melora.experiments.report.protocol import TABLE4

    records = []
    for seed in range(3):
        for r, dev in ((4, 0.70), (8, 0.72), (16, 0.74)):
            records.append(record("stsb", "lora", 1e-3, seed, 0.8, dev + seed / 100, r=r))
        for r, dev in ((2, 0.71), (4, 0.72), (8, 0.70)):
            records.append(record("stsb", "melora", 1e-3, seed, 0.8, dev + seed / 50, n=2, r=r))
        records.append(record("stsb", "melora", 1e-3, seed, 0.99, 0.99, n=8, r=1))  # a Table 2 row: not in Table 4
        records.append(record("stsb", "melora", 1e-3, seed, 0.99, 0.99, n=4, r=2))  # n=4: not Table 4's MELoRA
    table = build(records, layout=TABLE4)
    assert list(table.rows) == ["LoRA r=4", "MELoRA r=2", "LoRA r=8", "MELoRA r=4", "LoRA r=16", "MELoRA r=8"]
    assert table.rows["MELoRA r=2"]["stsb"].setting == "n=2"
    for melora_row, lora_row in TABLE4.references.items():
        mel, lora = table.rows[melora_row]["stsb"].dev.values, table.rows[lora_row]["stsb"].dev.values
        ref = stats.ttest_rel(mel, lora).confidence_interval(0.95)
        assert table.rows[melora_row]["stsb"].versus_reference.ci == pytest.approx((ref.low, ref.high))
    assert table.rows["LoRA r=4"]["stsb"].versus_reference is None
    header = to_csv(table).splitlines()[0].split(",")
    assert "reference" in header and "Δ vs reference (paired)" in header
    assert to_csv(table).splitlines()[2].startswith("MELoRA r=2,STS-B,n=2,0.001,—,1,3")
    assert ",LoRA r=4," in to_csv(table).splitlines()[2]
    assert set(build(records).rows) == {"LoRA r=8", "MELoRA r=8", "MELoRA r=1"}  # Table 2 keeps its own rows


def test_scaling_study_pairs_conventions_at_each_n_and_each_n_with_n2(tmp_path):
    """Each (n, convention) is its own row with its own validation-chosen lr; Δ against scipy's paired t interval."""
    from melora.experiments.report.figures import save_figure
    from melora.experiments.report.protocol import SCALING, SCALING_BY_N, note, scaling_figure

    def scaled(task, lr, seed, val, dev, n, scaling):
        out = record(task, "melora", lr, seed, val, dev, n=n, r=1)
        out["method_config"]["scaling"] = scaling
        return out

    records, dev = [], {}
    for n in (2, 8, 16):
        for scaling, base in (("per_mini", 0.80 - n / 100), ("equivalent", 0.78)):
            for seed in range(3):
                dev[(n, scaling, seed)] = base + seed / 100 + (seed * n % 3) / 200
                # validation prefers 1e-3 for per_mini and 3e-3 for equivalent; the dev of the losing lr is a trap
                good, bad = (1e-3, 3e-3) if scaling == "per_mini" else (3e-3, 1e-3)
                records += [scaled("stsb", good, seed, 0.85, dev[(n, scaling, seed)], n, scaling),
                            scaled("stsb", bad, seed, 0.60, 0.99, n, scaling)]
    records.append(scaled("stsb", 1e-3, 0, 0.99, 0.99, n=4, scaling="per_mini"))
    records.append(record("stsb", "lora", 1e-3, 0, 0.99, 0.99))  # neither is in the study

    table = build(records, layout=SCALING)
    assert list(table.rows) == ["MELoRA n=2 r=1", "MELoRA n=2 r=1 (equivalent)", "MELoRA n=8 r=1",
                                "MELoRA n=8 r=1 (equivalent)", "MELoRA n=16 r=1", "MELoRA n=16 r=1 (equivalent)"]
    assert table.rows["MELoRA n=8 r=1"]["stsb"].lr == 1e-3 and table.rows["MELoRA n=8 r=1 (equivalent)"]["stsb"].lr == 3e-3
    for n in (2, 8, 16):
        d = table.rows[f"MELoRA n={n} r=1 (equivalent)"]["stsb"].versus_reference
        ref = stats.ttest_rel([100 * dev[(n, "equivalent", s)] for s in range(3)], [100 * dev[(n, "per_mini", s)] for s in range(3)])
        assert d.ci == pytest.approx(tuple(ref.confidence_interval(0.95)))

    by_n = build(records, layout=SCALING_BY_N)
    d = by_n.rows["MELoRA n=16 r=1"]["stsb"].versus_reference
    ref = stats.ttest_rel([100 * dev[(16, "per_mini", s)] for s in range(3)], [100 * dev[(2, "per_mini", s)] for s in range(3)])
    assert d.ci == pytest.approx(tuple(ref.confidence_interval(0.95))) and d.verdict == "worse"
    assert by_n.rows["MELoRA n=2 r=1 (equivalent)"]["stsb"].versus_reference is None

    header = to_csv(table).splitlines()[0].split(",")
    assert "chosen" not in header and header[:4] == ["method", "task", "lr", "lr at grid edge"]
    assert "choose n" not in note(SCALING) and "equivalent − per_mini" in note(SCALING)
    fig = scaling_figure(table)
    assert len(fig.axes) == 1 and len(fig.axes[0].get_lines()) >= 2
    assert all(p.is_file() for p in save_figure(fig, tmp_path, "scaling"))


def test_heldout_tables_state_their_data_and_render_to_latex():
    from melora.experiments.report.protocol import data_note, to_latex

    records = [record("mrpc", "lora", 1e-3, s, 0.7, 0.7 + s / 100) | {"train_size": 2160, "eval_sizes": {"heldout": 240, "validation": 408},
                                                                      "config": {"task": {"lr": 1e-3, "epochs": 2}}} for s in (0, 1)]
    records.append(record("mrpc", "lora", 3e-3, 0, 0.9, 0.9, status="failed"))
    assert data_note(records) == "Data (examples): MRPC train 2160, held-out 240, dev 408, 2 epochs. Seeds: 0, 1."
    tex = to_latex(build(records), "Δ over ≥ 2 seeds, 10 %")
    assert r"\toprule" in tex and r"\label{tab:table2-heldout}" in tex
    assert r"$\Delta$ over $\geq$ 2 seeds, 10 \%" in tex and r"Failed runs: lora1-0.003-0" in tex
    assert "LoRA r=8 & MRPC & - & 0.001 & -- & 1 & 2 &" in tex


def test_a_chosen_lr_at_the_edge_of_its_grid_is_flagged():
    top = [record("sst2", "lora", lr, 0, val, 0.8) for lr, val in ((3e-4, 0.70), (1e-3, 0.75), (3e-3, 0.80))]
    middle = [record("mrpc", "lora", lr, 0, val, 0.8) for lr, val in ((3e-4, 0.70), (1e-3, 0.85), (3e-3, 0.80))]
    bottom = [record("cola", "lora", lr, 0, val, 0.8) for lr, val in ((3e-4, 0.90), (1e-3, 0.85), (3e-3, 0.80))]
    rows = build(top + middle + bottom).rows["LoRA r=8"]
    assert (rows["sst2"].edge, rows["mrpc"].edge, rows["cola"].edge) == ("top", "", "bottom")
    assert build(top[1:]).rows["LoRA r=8"]["sst2"].edge == ""  # two lrs tried: provisional, no edge claimed


def test_selection_signal_table_shows_what_each_metric_would_pick():
    from melora.experiments.report.protocol import selection_signal_rows

    records = [record("sst2", "lora", lr, 0, val, dev) for lr, val, dev in ((3e-4, 0.865, 0.767), (1e-3, 0.868, 0.786), (3e-3, 0.862, 0.797))]
    records.append(record("sst2", "lora", 1e-3, 1, 0.1, 0.1))  # another seed: not read
    header, body = selection_signal_rows(records, seed=0)
    row = dict(zip(header, body[0]))
    assert row["setting"] == "LoRA r=8" and row["dev"] == "76.7 / 78.6 / 79.7" and row["held-out"] == "86.5 / 86.8 / 86.2"
    assert (row["held-out picks"], row["dev would pick"]) == ("0.001", "0.003")
    assert row["dev spread"] == "3.0" and row["held-out spread"] == "0.6"


def test_forest_plot_keeps_long_labels_inside_the_figure():
    from melora.experiments.report.protocol import SCALING_BY_N, forest_plot

    records = []
    for s in range(3):
        for n in (2, 8, 16):
            for scaling in ("per_mini", "equivalent"):
                mc = {"method": "melora", "n": n, "r": 1, "scaling": scaling}
                records.append(dict(record("sst2", "melora", 1e-3, s, 0.8, 0.8 + n / 1000 + s / 100, n=n, r=1),
                                    method_config=mc, name=f"{n}{scaling}{s}"))
    fig = forest_plot(build(records, layout=SCALING_BY_N))
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [ax.title, ax.xaxis.label, *ax.get_yticklabels()]
    assert "(equivalent) − MELoRA n=2 r=1 (equivalent)" in ax.get_yticklabels()[0].get_text()
    width = fig.bbox.width
    assert all(0 <= t.get_window_extent(renderer).x0 and t.get_window_extent(renderer).x1 <= width for t in texts)
    assert ax.get_window_extent(renderer).width > 0.3 * width  # the axes are not squeezed by the labels
