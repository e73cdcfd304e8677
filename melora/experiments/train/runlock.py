"""One process at a time per run folder.

Two sweeps (or two commands) on one runs folder must never train the same run
at the same time: both would write its record, adapter and checkpoint. A run
entry decorated with :func:`exclusive_run` holds ``<run_dir>/.run.lock`` while
it works; a second process finds the lock taken, logs one line and returns a
record with ``status: "locked"`` without training (a sweep counts the run as
locked, not failed, and a later sweep picks it up if it is still unfinished).

The lock is an OS lock (``filelock``; ``flock`` on Linux, on a local or
lock-capable shared file system): the kernel drops it when its process ends,
however it ends, so a killed run never blocks the next one. The lock file itself
is left in place; it holds nothing.

Under ``accelerate launch`` every process of a job runs the entry, so each takes
its own lock: ``.run.lock`` for rank 0 (the same file as a one-process run),
``.run.lock.rank<k>`` for rank ``k``. The processes of one job do not exclude
each other, and a second job of the same size finds every lock taken.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

LOCK_FILE = ".run.lock"
LOCKED = "locked"  # the ``status`` of the record an entry returns for a run another process holds

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def lock_path(run_dir: str | os.PathLike) -> Path:
    """This process's lock file of ``run_dir`` (rank-specific under a multi-process launch)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    name = LOCK_FILE if world <= 1 or rank == 0 else f"{LOCK_FILE}.rank{rank}"
    return Path(run_dir) / name


@contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[bool]:
    """Hold ``run_dir``'s lock for the ``with`` block; yields whether it was free (never waits).

    ``run_dir`` is created if needed. A second ``run_lock`` on the same folder
    in the same process also finds it taken.
    """
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire(timeout=0)
        held = True
    except Timeout:
        held = False
    try:
        yield held
    finally:
        if held:
            lock.release()


def locked_record(run_dir: str | os.PathLike) -> dict:
    """What an entry returns instead of a record when another process holds the run."""
    return {"status": LOCKED, "run_dir": str(run_dir), "lock": str(lock_path(run_dir))}


def exclusive_run(entry: F) -> F:
    """Decorator for a run entry ``entry(cfg, ...)`` (``cfg.run_dir`` is its folder).

    Calls ``entry`` holding the folder's lock; when another process holds it,
    logs one line and returns :func:`locked_record` without calling ``entry``.
    """

    @functools.wraps(entry)
    def wrapper(cfg, *args, **kwargs):
        run_dir = Path(cfg.run_dir)
        with run_lock(run_dir) as held:
            if not held:
                log.warning("%s is in use by another process (%s is locked); skipping it", run_dir, lock_path(run_dir).name)
                return locked_record(run_dir)
            return entry(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
