"""The analysis notebooks are stored executed on the committed records, and run top to bottom on real smoke runs.

Two real GLUE smoke runs (LoRA r=8 and MELoRA 2×4 on MRPC, shrunk to a few
steps) are trained in-process once for this module; the notebooks read them
through ``MELORA_RUNS_DIR``, and the results CLI draws Figure 3 from their adapters.
"""

from pathlib import Path

import nbformat
import pytest
from conftest import data_dir

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ["singular_values", "sweeps"]
SHRINK = ["task.max_train_samples=16", "task.max_eval_samples=16", "task.epochs=1", "logger=none"]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    data_dir()
    import torch
    from test_glue_pipeline import train_in_process

    root = tmp_path_factory.mktemp("runs")
    # Two steps of a small model: threads only add OpenMP spin-waiting on shared CPU cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for tag, method in (("lora_r8", ["method=lora", "method.r=8"]), ("melora_n2_r4", ["method=melora", "method.n=2", "method.r=4"])):
            record = train_in_process(root / "smoke" / "glue-mrpc" / "minilm" / tag / "seed0", "task=glue/mrpc", *method, *SHRINK)
            assert record["status"] == "completed" and record["method_tag"] == tag
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_executed_on_the_committed_records(name):
    """A fresh clone shows the plots without running anything (``MELORA_RUNS_DIR=results/runs/mini``)."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "results/runs/mini" in text and str(ROOT) not in text  # repository-relative paths only
    assert any('os.environ.get("MELORA_RUNS_DIR", "runs/mini")' in c.source for c in code)


def execute(name: str, runs: Path, monkeypatch) -> str:
    from nbclient import NotebookClient

    monkeypatch.setenv("MELORA_RUNS_DIR", str(runs))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: see smoke_runs
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
            if "image/png" in out.get("data", {}):
                texts.append("<png>")
    return "\n".join(texts)


def test_singular_values_notebook(smoke_runs, monkeypatch):
    out = execute("singular_values", smoke_runs, monkeypatch)
    assert "2 completed GLUE runs with a saved adapter or exported spectra" in out
    assert "12 adapted layers, e.g. bert.encoder.layer.0.attention.self.query" in out
    assert "lora_r8" in out and "melora_n2_r4" in out
    assert out.count("<png>") == 3  # spectra per layer, counts vs threshold, Figure 3


def test_sweeps_notebook(smoke_runs, monkeypatch):
    out = execute("sweeps", smoke_runs, monkeypatch)
    assert "minilm, profile smoke: 2 runs, 2 completed" in out
    assert out.count("<png>") == 3  # n sweep, r sweep, params / equivalent rank


def test_results_from_smoke_runs(smoke_runs, tmp_path):
    from melora.experiments.report import make_results
    from melora.experiments.report.figures import figure3, save_figure
    from melora.experiments.report.records import load_records

    written = make_results(smoke_runs, tmp_path, only=["table2", "table3", "table4", "figure4"], log=lambda message: None)
    assert sorted(written) == ["figure4", "table2", "table4"]  # no instruct runs: Table 3 skipped
    table4 = (tmp_path / "tables" / "table4.md").read_text()
    assert "| R=8 | MELoRA n=2 r=4 | 36.9K |" in table4 and "profile smoke" in table4 and "MRPC train 16, dev 16" in table4
    fig = figure3(load_records(smoke_runs))  # the adapters in a fresh MiniLM, as make_results does
    assert [ax.get_title() for ax in fig.axes] == ["MRPC: MELoRA n=2 r=4 vs LoRA r=8"]
    lora_query = fig.axes[0].get_lines()[0].get_ydata()
    assert len(lora_query) == 6 and max(lora_query) <= 8  # MiniLM's six blocks; rank ≤ r
    assert all(p.stat().st_size > 1000 for p in save_figure(fig, tmp_path / "figures", "figure3"))


def test_exported_runs_hold_spectra_not_weights(smoke_runs, tmp_path, monkeypatch):
    """``results/runs/<profile>``: records and ΔW spectra, no weights; Figure 3 and the notebook read it."""
    import torch

    from melora.experiments.report.export import export_runs
    from melora.experiments.report.records import load_records
    from melora.experiments.report.spectra import run_spectra

    out = tmp_path / "exported"
    assert export_runs(smoke_runs, out, log=lambda message: None) == 2
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [f"smoke/glue-mrpc/minilm/{tag}/seed0/{name}" for tag in ("lora_r8", "melora_n2_r4")
                     for name in ("config.yaml", "record.json", "spectra.json")]
    originals = {r["method_tag"]: r for r in load_records(smoke_runs)}
    for exported in load_records(out):
        direct = run_spectra(originals[exported["method_tag"]], threshold=0.01)
        from_file = run_spectra(exported, threshold=0.01)
        assert sorted(direct) == sorted(from_file)
        for name, sp in direct.items():
            stored = from_file[name].singular_values
            # The nonzero part, to 7 digits: ΔW's rank is at most n·r, the rest is round-off.
            assert len(stored) <= sp.nominal_rank
            assert torch.allclose(stored, sp.singular_values[: len(stored)], rtol=1e-6, atol=0)
            assert (sp.singular_values[len(stored):] <= 1e-10).all()
            assert sp.count_above == from_file[name].count_above and sp.nominal_rank == from_file[name].nominal_rank
    text = execute("singular_values", out, monkeypatch)
    assert "2 completed GLUE runs with a saved adapter or exported spectra" in text and text.count("<png>") == 3
