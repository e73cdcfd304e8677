"""Sweeps are Hydra multiruns: the ``spec`` sweeper on the joblib launcher, and submitit's local executor.

Real processes and real smoke runs (SST-2, 32 examples, a few seconds each):
missing runs are trained in parallel workers, complete ones skipped, a run
another process holds is counted as locked, a failing run is named and the
sweep exits non-zero after the others; the SLURM launcher's code path runs
here through ``hydra/launcher=submitit_local``, and the report finds its records.
"""

import re
import subprocess
import sys

from conftest import data_dir
from test_run_safety import ENV, ROOT, TASK, hold_lock, processes  # noqa: F401 (fixture)

from melora.experiments.report.records import label_of, load_records
from melora.experiments.sweep import RunSpec, compose_run

SPEC = """\
name: tiny
entry: glue
profiles:
  smoke:
    seeds: [0]
    overrides: [model=minilm, {task}]
groups:
  - tasks: [glue/sst2]
    methods:
      - [method=melora, method.r=1, "method.n=2,4,7"]
"""


def sweep(spec, runs_root, *extra):
    cmd = [sys.executable, "-m", "melora.experiments.sweep", str(spec), "--profile", "smoke", "--jobs", "2",
           f"runs_root={runs_root}", "logger=none", "trainer.progress=false", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)


def test_spec_sweep_runs_the_missing_runs_in_parallel_and_skips_complete_ones(tmp_path, processes):
    data_dir()
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC.format(task=", ".join(t for t in TASK if not t.startswith("task="))))
    runs = tmp_path / "runs"
    held = compose_run(RunSpec("glue", ["profile=smoke", "model=minilm", *TASK[1:], "task=glue/sst2", "method=melora",
                                        "method.r=1", "method.n=4", "seed=0"]), [f"runs_root={runs}"]).run_dir
    holder = hold_lock(held, processes)

    first = sweep(spec, runs)
    out = first.stdout + first.stderr
    assert first.returncode == 1, out[-3000:]
    assert "tiny (smoke): 3 runs, 0 complete, 3 to run" in out
    assert "1 completed, 0 diverged, 1 locked, 1 failed" in out
    assert f"locked (another process trains it): {held}" in out
    assert "FAILED: " in out and "n7" in out.split("FAILED: ")[1].splitlines()[0]
    assert "is not divisible by n=7" in out
    assert re.search(r"Done\s+3 out of\s+3", out)  # joblib's progress line

    holder.kill()
    holder.wait()
    second = sweep(spec, runs)
    out = second.stdout + second.stderr
    assert "tiny (smoke): 3 runs, 1 complete, 2 to run" in out and "1 completed, 0 diverged, 0 locked, 1 failed" in out
    records = [r for r in load_records(runs) if r.get("status") == "completed"]
    assert sorted(label_of(r) for r in records) == ["MELoRA n=2 r=1", "MELoRA n=4 r=1"]


def test_submitit_local_launcher_runs_a_multirun_the_report_finds(tmp_path):
    """``hydra/launcher=slurm`` is submitit's SLURM executor; its local executor runs the same path here."""
    data_dir()
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "melora.experiments.glue", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           "profile=smoke", *TASK, "method=melora", "method.r=1", "method.n=2,8", f"runs_root={runs}", "logger=none",
           "trainer.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = load_records(runs)
    assert sorted(label_of(r) for r in records if r.get("status") == "completed") == ["MELoRA n=2 r=1", "MELoRA n=8 r=1"]
    assert all(r["run_dir"].startswith(str(runs / "smoke" / "glue-sst2" / "minilm")) for r in records)
