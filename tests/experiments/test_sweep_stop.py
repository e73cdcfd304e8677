"""Stopping a sweep stops the processes it started, the launcher's workers included."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

# A stand-in for `python -m melora.experiments.glue -m …` with joblib: a child that starts a worker of its own.
CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[1], "w").write(str(worker.pid))
    time.sleep(120)
    """
)
# The sweep's side: melora.experiments.sweep.call_in_group runs the child.
PARENT = textwrap.dedent(
    """
    import sys
    from melora.experiments.sweep import call_in_group
    call_in_group([sys.executable, "-c", sys.argv[1], sys.argv[2]], grace_s=5)
    """
)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_sigterm_to_the_sweep_stops_the_launchers_workers(tmp_path):
    pid_file = tmp_path / "worker.pid"
    sweep = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(pid_file)])
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text()), "the worker never started"
        worker = int(pid_file.read_text())
        assert not gone(worker)
        os.kill(sweep.pid, signal.SIGTERM)
        assert sweep.wait(timeout=30) == 128 + signal.SIGTERM
        assert wait_for(lambda: gone(worker)), "the launcher's worker outlived the stopped sweep"
    finally:
        sweep.kill()
        if pid_file.exists() and pid_file.read_text() and not gone(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
