"""A full disk while writing a checkpoint, an adapter or a record: one line, nothing good lost, the rerun resumes.

The device is simulated by a writer that writes part of the bytes and then
raises ``OSError(ENOSPC)``, as ``write(2)`` does when the file system fills up
mid-file: every file melora writes goes through :func:`melora.files._write`.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import data_dir, tiny_bert

import melora
import melora.files
from melora.experiments.train.checkpoint import inspect_resume, save_checkpoint
from melora.files import DiskFull, atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
# A smoke run of 8 optimiser steps (4 a epoch), a checkpoint after each (eval_every=1).
RUN = ["profile=smoke", "task=glue/sst2", "task.max_train_samples=32", "task.max_eval_samples=16", "task.epochs=2",
       "trainer.eval_every=1", "method=melora", "method.n=2", "method.r=1", "logger=none", "trainer.progress=false"]


def fill_up_part_way(monkeypatch, when=lambda f: True) -> list[str]:
    """Make every write for which ``when(file)`` holds stop half-way with ENOSPC; returns the names it stopped."""
    stopped: list[str] = []
    real = melora.files._write

    def write(f, data):
        if not when(f):
            return real(f, data)
        f.write(data[: len(data) // 2])
        stopped.append(str(getattr(f, "name", "")))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(melora.files, "_write", write)
    return stopped


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def a_model_and_its_optimizer():
    model = melora.inject(tiny_bert(), melora.MELoRAConfig(r=2, n=2, target_modules=["query", "value"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    model, optimizer, scheduler = a_model_and_its_optimizer()
    state = {"global_step": 3, "epoch": 0, "history": [], "best_metric": None, "best_step": None}
    save_checkpoint(tmp_path, model, optimizer, scheduler, state)
    before = snapshot(tmp_path)

    stopped = fill_up_part_way(monkeypatch, when=lambda f: str(f.name).endswith("optimizer.pt"))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(DiskFull) as err:
        save_checkpoint(tmp_path, model, optimizer, scheduler, dict(state, global_step=4))
    assert stopped, "the write was not reached"
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"no space left on device in {tmp_path}: writing the checkpoint (checkpoint/) needed ")
    assert "free some space there" in message and "rerun the same command" in message
    assert err.value.errno == errno.ENOSPC and err.value.needed > 0
    assert snapshot(tmp_path) == before  # the previous checkpoint, byte for byte, and no temp folder
    plan = inspect_resume(tmp_path)
    assert plan.checkpoint is not None and not plan.move and plan.checkpoint.state["global_step"] == 3


def test_a_record_or_an_adapter_that_does_not_fit_leaves_the_previous_file(tmp_path, monkeypatch):
    record = tmp_path / "record.json"
    atomic_write_json(record, {"status": "running", "global_step": 2})
    model, _, _ = a_model_and_its_optimizer()
    adapter = melora.save_adapter(model, tmp_path / "adapter")
    before = snapshot(tmp_path)

    fill_up_part_way(monkeypatch)
    with pytest.raises(DiskFull) as err:
        atomic_write_json(record, {"status": "running", "global_step": 3, "history": list(range(1000))})
    assert str(err.value).startswith(f"no space left on device in {tmp_path}: writing record.json needed ")
    with pytest.raises(DiskFull) as err:
        melora.save_adapter(model, adapter)
    assert str(err.value).startswith(f"no space left on device in {adapter}: writing adapter_model.safetensors needed ")
    assert snapshot(tmp_path) == before  # no half file, no temp file left behind


# A run in a fresh interpreter (forking this one after torch started its thread pool is not safe for training)
# whose disk fills up part-way through the checkpoint after ``count`` of them: argv = count, then the run's arguments.
FILLING_RUN = """
import errno, os, sys
import melora.files

count, args = int(sys.argv[1]), sys.argv[2:]
real, saved = melora.files._write, []

def write(f, data):
    name = str(getattr(f, "name", ""))
    if ".checkpoint.tmp" in name and name.endswith("state.json"):
        saved.append(name)
    if count >= 0 and ".checkpoint.tmp" in name and name.endswith("adapter.safetensors") and len(saved) >= count:
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(f, data)

melora.files._write = write
import melora.experiments.glue as entry

sys.argv = [entry.__file__, *args]
entry.main()
"""


def run_glue(args: list[str], fill_up_after: int = -1) -> tuple[int, str]:
    """``python -m melora.experiments.glue <args>`` in a fresh process; ``fill_up_after`` ≥ 0: the disk fills part-way
    through the checkpoint after that many. Returns ``(exit status, stdout + stderr)``."""
    proc = subprocess.run([sys.executable, "-c", FILLING_RUN, str(fill_up_after), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_run_whose_disk_fills_up_says_so_in_one_line_and_the_rerun_resumes(tmp_path):
    data_dir()
    run_dir = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={run_dir}"]
    status, out = run_glue(args, fill_up_after=3)
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert status == 1 and "Traceback" not in out, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(f"Error: no space left on device in {run_dir}: writing the checkpoint (checkpoint/) needed ")
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["global_step"] == 3  # the last checkpoint that fitted
    assert json.loads((run_dir / "record.json").read_text())["status"] == "running"
    assert not list(run_dir.glob(".checkpoint*")) and not list(run_dir.rglob("*.tmp"))

    status, out = run_glue(args)
    assert status == 0, out[-3000:]
    assert f"resuming {run_dir} from step 3 " in out
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 8
