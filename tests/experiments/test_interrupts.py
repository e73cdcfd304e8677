"""Ctrl-C and SIGTERM with real processes: a smoke sweep on two loky workers, and a single run.

A Ctrl-C is SIGINT to the foreground process group: ``melora.experiments.sweep`` alone (its
child sweep runs in a session of its own), or ``melora.experiments.glue`` with its
children. After the first optimiser step (a checkpoint exists, ``eval_every=1``)
the signal must end every process within ~10 s, print one summary line with
the command that resumes, keep the finished run's record and the stopped run's
checkpoint, and print no leaked-resource warnings; the same command resumes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import data_dir

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
STOP_WITHIN_S = 12  # the ~10 s the sweep promises, plus a loaded CI machine's slack
# One run that finishes at once (2 steps) and one that is still training when the signal comes (64 steps);
# eval_every=1: a checkpoint after every optimiser step.
SPEC = """\
name: stoppable
entry: glue
profiles:
  smoke:
    seeds: [0]
    overrides: [model=minilm, task.max_eval_samples=16, trainer.eval_every=1]
groups:
  - tasks: [glue/sst2]
    methods:
      - [method=lora, method.r=1, task.max_train_samples=16, task.epochs=1]
      - [method=lora, method.r=2, task.max_train_samples=512, task.epochs=1]
"""


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """``cmd`` in a session of its own (as a shell runs a foreground job), stdout and stderr to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def stop_and_time(proc: subprocess.Popen, signum: int, group: bool = True) -> float:
    """Send ``signum`` (to the process group: Ctrl-C) and return the seconds until the process exited."""
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, signum)
    proc.wait(timeout=60)
    return time.monotonic() - t0


def run_dirs(runs: Path) -> dict[str, Path]:
    """``{"r1": folder, "r2": folder}`` of the spec's runs that have started (by method tag: lora_r1, lora_r2)."""
    return {d.parent.name.split("_")[-1]: d for d in runs.glob("smoke/glue-sst2/minilm/lora_*/seed0")}


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoint" / "state.json").is_file()


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "record.json").read_text())["status"] == "completed"
    except (OSError, ValueError, KeyError):
        return False


def summary_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("interrupted")]


def sweep_command(spec: Path, runs: Path) -> list[str]:
    return [sys.executable, "-m", "melora.experiments.sweep", str(spec), "--profile", "smoke", "--jobs", "2", f"runs_root={runs}", "logger=none"]


@pytest.fixture
def started():
    """Processes a test starts; their groups are killed at the end if still there."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def interrupt_the_sweep(tmp_path, started) -> tuple[Path, Path, Path, str]:
    """Start the two-run sweep on two workers, Ctrl-C it once run r1 is complete and r2 has a checkpoint.

    Returns ``(spec, runs, log, output)`` after checking the stop.
    """
    data_dir()
    spec, runs, log = tmp_path / "stoppable.yaml", tmp_path / "runs", tmp_path / "sweep.log"
    spec.write_text(SPEC)
    sweep = start(sweep_command(spec, runs), log)
    started.append(sweep)

    def ready():
        dirs = run_dirs(runs)
        return "r1" in dirs and "r2" in dirs and completed(dirs["r1"]) and has_checkpoint(dirs["r2"])

    wait_for(ready, sweep, log)
    procs = descendants(sweep)
    assert len(procs) >= 3, [p.cmdline() for p in procs]  # the child sweep and its two workers (and resource trackers)
    took = stop_and_time(sweep, signal.SIGINT)
    out = log.read_text()
    assert sweep.returncode == 130, out[-3000:]
    assert took < STOP_WITHIN_S, f"took {took:.1f} s"
    assert not alive(procs), [p.cmdline() for p in alive(procs)]
    lines = summary_lines(out)
    assert len(lines) == 1, out[-3000:]
    assert "1 of 2 runs finished" in lines[0] and "1 stopped mid-run" in lines[0], lines[0]
    assert lines[0].endswith(f"rerun the same command to resume: python -m melora.experiments.sweep {spec} --profile smoke --jobs 2 "
                             f"runs_root={runs} logger=none")
    assert "leaked" not in out and "Traceback" not in out, out[-3000:]
    return spec, runs, log, out


def test_ctrl_c_stops_a_sweep_and_its_workers_and_keeps_what_they_wrote(tmp_path, started):
    from melora.experiments.train.checkpoint import inspect_resume

    _, runs, _, _ = interrupt_the_sweep(tmp_path, started)
    dirs = run_dirs(runs)
    assert completed(dirs["r1"])  # the finished run's record is intact
    record = json.loads((dirs["r2"] / "record.json").read_text())
    assert record["status"] == "running"
    plan = inspect_resume(dirs["r2"])  # the stopped run resumes from its last checkpoint, which is whole
    assert plan.checkpoint is not None and not plan.move and plan.checkpoint.state["global_step"] >= 1
    assert not list(dirs["r2"].glob(".checkpoint.*")) and not list(dirs["r2"].rglob("*.tmp"))


@pytest.mark.slow
def test_the_same_command_resumes_an_interrupted_sweep_and_a_second_ctrl_c_exits_at_once(tmp_path, started):
    spec, runs, _, _ = interrupt_the_sweep(tmp_path, started)
    step = json.loads((run_dirs(runs)["r2"] / "checkpoint" / "state.json").read_text())["global_step"]

    log = tmp_path / "again.log"
    again = start(sweep_command(spec, runs), log)
    started.append(again)
    wait_for(lambda: "resuming" in log.read_text(), again, log)
    out = log.read_text()
    assert "stoppable (smoke): 2 runs, 1 complete, 1 to run" in out
    assert f"resuming {run_dirs(runs)['r2']} from step {step} " in out

    procs = descendants(again)
    t0 = time.monotonic()
    os.killpg(again.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(again.pid, signal.SIGINT)  # no patience: the second Ctrl-C does not wait for the workers
    again.wait(timeout=30)
    assert time.monotonic() - t0 < 5
    assert again.returncode == 130
    assert wait_for_gone(procs), [p.cmdline() for p in alive(procs)]
    lines = summary_lines(log.read_text())
    assert len(lines) == 1 and "rerun the same command to resume" in lines[0], log.read_text()[-3000:]


def wait_for_gone(procs: list[psutil.Process], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_sigterm_stops_a_run_which_keeps_its_checkpoint_and_says_how_to_resume(tmp_path, started):
    data_dir()
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    args = [f"hydra.run.dir={run_dir}", "profile=smoke", "task=glue/sst2", "task.max_train_samples=512", "task.epochs=1", "task.max_eval_samples=16",
            "trainer.eval_every=1", "method=lora", "logger=none"]
    run = start([sys.executable, "-m", "melora.experiments.glue", *args], log)
    started.append(run)
    wait_for(lambda: has_checkpoint(run_dir), run, log)
    took = stop_and_time(run, signal.SIGTERM, group=False)
    out = log.read_text()
    assert run.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert took < STOP_WITHIN_S, f"took {took:.1f} s"
    step = json.loads((run_dir / "checkpoint" / "state.json").read_text())["global_step"]
    lines = summary_lines(out)
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert f"{run_dir} stopped; its last checkpoint (step {step} of 64)" in lines[0]
    assert lines[0].endswith("rerun the same command to resume from it: python -m melora.experiments.glue " + " ".join(args))
    assert json.loads((run_dir / "record.json").read_text())["status"] == "running"
