"""Figures 3–5 from synthetic records: panels, titles, lines, files; the results CLI."""

import importlib.util
from pathlib import Path

import pytest
from conftest import randomize_adapters, tiny_bert
from test_report_tables import fake_record, glue_runs

import melora
from melora.experiments.report import make_results
from melora.experiments.report.figures import figure3, figure4, figure5, save_figure
from melora.experiments.report.records import load_records
from melora.experiments.report.spectra import run_spectra

ROOT = Path(__file__).resolve().parents[2]


def sweep_runs(root: Path, profile: str = "unit") -> list[dict]:
    """LoRA r ∈ {1, 2, 4} (n = 1) and MELoRA n ∈ {2, 4} × r ∈ {1, 2, 4} on MRPC and STS-B, two seeds."""
    for task in ("mrpc", "stsb"):
        for seed in (0, 1):
            for r in (1, 2, 4):
                fake_record(root, task, f"lora_r{r}", seed, 0.70 + 0.01 * r + 0.02 * seed, profile=profile)
                for n in (2, 4):
                    fake_record(root, task, f"melora_n{n}_r{r}", seed, 0.70 + 0.01 * r + 0.001 * n + 0.02 * seed, profile=profile)
    return load_records(root)


def series(ax) -> dict[str, tuple[list, list]]:
    """Legend label → (x, y) of each error-bar line."""
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    return {label: (list(c.lines[0].get_xdata()), [round(y, 6) for y in c.lines[0].get_ydata()]) for label, c in zip(labels, ax.containers)}


def test_figure4_one_panel_per_task_lines_per_r(tmp_path):
    fig = figure4(sweep_runs(tmp_path))
    assert [ax.get_title() for ax in fig.axes] == ["MRPC (accuracy)", "STS-B (Pearson corr.)"]
    lines = series(fig.axes[0])
    assert list(lines) == ["r=2", "r=4"]
    # mean over seeds 0, 1 of 0.70 + 0.01 r + 0.001 n (+0.02 for seed 1), ×100; n = 1 is LoRA.
    assert lines["r=2"] == ([1, 2, 4], [73.0, 73.2, 73.4])
    assert fig.axes[0].get_xlabel() == "n (number of mini LoRAs)" and fig.axes[0].get_ylabel() == "dev metric ×100"
    paths = save_figure(fig, tmp_path / "figures", "figure4")
    assert [p.name for p in paths] == ["figure4.png", "figure4.pdf"] and all(p.stat().st_size > 1000 for p in paths)


def test_figure5_lines_per_n(tmp_path):
    fig = figure5(sweep_runs(tmp_path))
    assert len(fig.axes) == 2
    lines = series(fig.axes[1])
    assert list(lines) == ["n=1 (LoRA)", "n=2"]
    assert lines["n=1 (LoRA)"] == ([1, 2, 4], [72.0, 73.0, 75.0])
    assert fig.axes[1].get_xlabel() == "r (rank of each mini LoRA)"


def test_figure_tasks_follow_the_spec_at_its_profile(tmp_path):
    fig = figure4(sweep_runs(tmp_path, profile="paper"))  # the paper spec's tasks, present or not
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == ["QNLI", "SST-2", "CoLA", "STS-B"]
    assert [t.get_text() for t in fig.axes[0].texts] == ["no completed runs"]


def test_no_runs_no_figure(tmp_path):
    assert figure4([]) is None and figure3([]) is None


def adapter_runs(root: Path) -> list[dict]:
    """Real adapters saved from a tiny BERT: LoRA r=8 (two seeds), MELoRA 2×4 and 8×8."""
    settings = {"lora_r8": melora.LoRAConfig(r=8, target_modules=["query", "value"]),
                "melora_n2_r4": melora.MELoRAConfig(n=2, r=4, target_modules=["query", "value"]),
                "melora_n8_r8": melora.MELoRAConfig(n=8, r=8, target_modules=["query", "value"])}
    for tag, config in settings.items():
        for seed in ((0, 1) if tag == "lora_r8" else (0,)):
            fake_record(root, "mrpc", tag, seed, 0.8)
            model = melora.inject(tiny_bert(num_labels=2), config)
            randomize_adapters(model, seed=seed + 1)
            melora.save_adapter(model, root / "unit" / "glue-mrpc" / "minilm" / tag / f"seed{seed}" / "adapter")
    return load_records(root)


def test_figure3_counts_singular_values_per_layer(tmp_path):
    records = adapter_runs(tmp_path)
    fig = figure3(records, base_model=lambda record: tiny_bert(num_labels=2))
    assert [ax.get_title() for ax in fig.axes] == ["MRPC: MELoRA n=2 r=4 vs LoRA r=8", "MRPC: MELoRA n=8 r=8 vs LoRA r=8"]
    ax = fig.axes[1]
    assert ax.get_ylabel() == "# singular values > 0.1" and ax.get_xlabel() == "layer"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["LoRA r=8 (query)", "LoRA r=8 (value)", "MELoRA n=8 r=8 (query)", "MELoRA n=8 r=8 (value)"]

    def counts(tag, seed, kind):
        run = next(r for r in records if r["method_tag"] == tag and r["seed"] == seed)
        spectra = run_spectra(run, base_model=lambda record: tiny_bert(num_labels=2))
        return [spectra[f"bert.encoder.layer.{i}.attention.self.{kind}"].count_above for i in (0, 1)]

    lines = {label: list(line.get_ydata()) for label, line in zip(labels, ax.get_lines())}
    lora = [(a + b) / 2 for a, b in zip(counts("lora_r8", 0, "query"), counts("lora_r8", 1, "query"))]
    assert lines["LoRA r=8 (query)"] == lora and max(lora) <= 8  # mean over the two seeds; rank ≤ r
    assert lines["MELoRA n=8 r=8 (value)"] == counts("melora_n8_r8", 0, "value")
    assert max(lines["MELoRA n=8 r=8 (value)"]) > 8  # block diagonal: more than LoRA r=8 can reach


def test_make_results_writes_and_skips(tmp_path):
    glue_runs(tmp_path / "runs")
    sweep_runs(tmp_path / "runs")
    messages = []
    written = make_results(tmp_path / "runs", tmp_path / "out", profile="unit", log=messages.append)
    assert sorted(written) == ["figure4", "figure5", "table2", "table4"]
    for name in ("table2", "table4"):
        assert all((tmp_path / "out" / "tables" / f"{name}.{ext}").is_file() for ext in ("md", "csv", "tex"))
    assert all((tmp_path / "out" / "figures" / f"figure4.{ext}").is_file() for ext in ("png", "pdf"))
    assert f"table3: no matching runs in {tmp_path / 'runs'}; skipped" in messages
    assert f"figure3: no matching runs in {tmp_path / 'runs'}; skipped" in messages
    with pytest.raises(ValueError, match="unknown artifacts"):
        make_results(tmp_path / "runs", tmp_path / "out", only=["table9"])


def load_cli():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_and_only(tmp_path, capsys):
    cli = load_cli()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--runs" in out and "--only NAME [NAME ...]" in out and "runs/paper --out results --only table2 figure4" in out
    sweep_runs(tmp_path / "runs")
    assert cli.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--only", "figure5"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.*")) == ["figure5.pdf", "figure5.png"]
    assert cli.main(["--runs", str(tmp_path / "missing")]) == 2
    assert "no runs folder" in capsys.readouterr().err


def test_cli_demo_prints_its_table(tmp_path, capsys):
    for task, values in (("mrpc", (0.80, 0.82, 0.81)), ("stsb", (0.88, 0.90, 0.87))):
        for tag, value in zip(("lora_r8", "melora_n2_r8", "melora_n8_r1"), values):
            fake_record(tmp_path / "runs", task, tag, 0, value)
    assert load_cli().main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "demo"), "--only", "demo", "--print"]) == 0
    out = capsys.readouterr().out
    assert "## Demo (a slice of Table 2): GLUE dev results, minilm" in out
    assert "| MELoRA n=8 r=1 | 9.2K | 81.0 | 87.0 | 84.0 |" in out
    assert (tmp_path / "demo" / "tables" / "demo.md").read_text() in out


def test_heldout_figures_plot_dev_at_the_lr_validation_chose():
    """Each (n, r) point takes the lr with the best mean validation metric; the dev metric at that lr is drawn."""

    def run(method, n, r, lr, seed, val, dev):
        mc = {"method": method, "n": n, "r": r}
        return {"kind": "glue", "task": "stsb", "metric": "pearson", "status": "completed", "seed": seed, "model": "minilm",
                "profile": "mini", "selection": {"split": "heldout"}, "method_config": mc, "config": {"task": {"lr": lr}},
                "best_metric": val, "best_metrics": {"pearson": dev}}

    records = []
    for seed in (0, 1, 2):
        for r in (2, 4):
            records.append(run("lora", 1, r, 1e-3, seed, 0.80, 0.70 + seed / 100))
            records.append(run("lora", 1, r, 3e-3, seed, 0.70, 0.99))  # best dev, worse validation: never drawn
            records.append(run("melora", 4, r, 3e-3, seed, 0.85, 0.60 + r / 100))
            records.append(run("melora", 4, r, 1e-3, seed, 0.84, 0.99))
        records.append(dict(run("melora", 4, 2, 1e-3, seed, 0.99, 0.11), selection={"split": "dev"}))  # not held-out: left out
    records += [run("lora", 1, r, 1e-3, 3, 0.80, 0.10) for r in (2, 4)]  # a Table 4 seed beyond the figure spec's 0-2: left out
    fig = figure4(records, heldout=True)
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == ["SST-2", "STS-B"]  # figures45_heldout's mini tasks
    lines = series(fig.axes[1])
    assert lines["r=2"] == ([1, 4], [71.0, 62.0]) and lines["r=4"] == ([1, 4], [71.0, 64.0])
    assert "held-out:" in fig._suptitle.get_text() and "seeds 0, 1, 2" in fig._suptitle.get_text()
    assert figure5(records, heldout=True) is not None
    assert figure4([r for r in records if r["method_config"]["r"] == 8], heldout=True) is None  # no run on its lines

    from scipy import stats

    from melora.experiments.report.figures import heldout_sweep_rows

    header, body = heldout_sweep_rows(records, "n", (2, 4))
    assert header[:4] == ["task", "line", "n", "lr"] and [row[:5] for row in body] == [
        ["STS-B", "r=2", "1", "0.001", "3"], ["STS-B", "r=2", "4", "0.003", "3"], ["STS-B", "r=4", "1", "0.001", "3"], ["STS-B", "r=4", "4", "0.003", "3"]]
    ref = stats.ttest_rel([60.0 + 2] * 3, [70.0, 71.0, 72.0]).confidence_interval(0.95)  # MELoRA 4x2 against LoRA r=2, paired
    assert body[1][7:] == ["-9.0", f"[{ref.low:.1f}, {ref.high:.1f}]", "worse"] and body[0][9] == "reference"


def test_make_results_scaling_writes_only_the_scaling_study(tmp_path):
    """--only scaling: the study's two tables, forest plots and figure; no held-out Table 2 from its per_mini runs."""
    for n in (2, 8, 16):
        for scaling in ("per_mini", "equivalent"):
            for seed in (0, 1, 2):
                value = 0.8 - n / 200 + seed / 100
                fake_record(tmp_path / "runs" / scaling, "stsb", f"melora_n{n}_r1", seed, value,
                            selection={"split": "heldout"}, config={"task": {"lr": 1e-3}},
                            best_metrics={"pearson": value - 0.05}, metric="pearson",
                            method_config={"method": "melora", "n": n, "r": 1, "alpha": 16, "scaling": scaling})
    written = make_results(tmp_path / "runs", tmp_path / "out", only=["scaling"], log=lambda message: None)
    assert sorted(written) == ["scaling", "scaling_by_n", "scaling_figure", "verdicts_scaling", "verdicts_scaling_by_n"]
    assert not (tmp_path / "out" / "tables" / "table2_heldout.md").exists()
    assert (tmp_path / "out" / "figures" / "scaling.png").is_file()
    lines = (tmp_path / "out" / "tables" / "scaling_by_n.csv").read_text().splitlines()
    assert lines[-1].startswith("MELoRA n=16 r=1 (equivalent),STS-B,0.001,—,1,3,")
