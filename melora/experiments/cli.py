"""What the command-line tools share: one-line errors, and Ctrl-C / SIGTERM that stop at once and say how to resume.

Every file a run writes (record, checkpoint, adapter) is written whole or not
at all (a temp file or folder, then a rename), so a run stopped at any moment
keeps its last checkpoint and rerunning the same command resumes from it. This
module adds the rest of a clean stop:

- :func:`stop_signals`: SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the
  main thread (SIGTERM's default action ends a process without a word and
  without its clean-up); a second signal ends the process at once.
- :func:`resume_command`: the command line that resumes, for the summary line.
- :func:`error_line`: the one line an error the user can fix is reported in
  (``Error: …``), or ``None`` for an error whose traceback is needed.

``HYDRA_FULL_ERROR=1`` (or ``--debug`` for ``melora.experiments.sweep``) keeps the tracebacks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the melora package, library included
RESUME_ENV = "MELORA_RESUME_COMMAND"  # the command a sweep's child names in its summary line (melora.experiments.sweep's own)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def debugging() -> bool:
    """Whether tracebacks are wanted (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def raised_by_melora(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in the melora package."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def error_line(err: BaseException) -> str | None:
    """``Error: <message>`` on one line for an error the user can fix, ``None`` for one whose traceback is needed.

    The first: a ``ValueError`` or ``FileNotFoundError`` raised by melora's own
    code (a configuration or input error, a file that is missing or damaged),
    and running out of disk space anywhere. ``None`` also under ``HYDRA_FULL_ERROR=1``.
    """
    if debugging():
        return None
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        from melora.files import DiskFull

        message = str(err) if isinstance(err, DiskFull) else (
            f"no space left on device{f' writing {err.filename}' if err.filename else ''}: free some space there "
            "(or choose another runs_root=…) and rerun the same command; finished runs are kept and unfinished ones resume"
        )
    elif isinstance(err, (ValueError, FileNotFoundError)) and raised_by_melora(err):
        message = str(err)
    else:
        return None
    return "Error: " + " ".join(message.split("\n"))


def exit_on_user_error(err: BaseException) -> None:
    """Print ``err``'s one line and exit with status 1 when the user can fix it (:func:`error_line`); else return, for the caller to re-raise."""
    line = error_line(err)
    if line is not None:
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def resume_command(module: str, args: list[str] | None = None) -> str:
    """``python -m <module> <args>`` (this process's arguments by default), quoted for a shell."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if args is None else args)])


@dataclass
class Stop:
    """The signal that stopped the work (``None`` while none came)."""

    signum: int | None = None

    @property
    def status(self) -> int:
        """The exit status of a process stopped by this signal: ``128 + signum`` (130 for Ctrl-C)."""
        return 128 + (self.signum or signal.SIGINT)


def kill_own_children() -> None:
    """SIGKILL every process this one started (and theirs): the quick way out on a second Ctrl-C."""
    try:
        import psutil
    except ImportError:  # psutil comes with accelerate; without it the children see their parent go
        return
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()


@contextlib.contextmanager
def stop_signals(on_second: Callable[[int], None] | None = kill_own_children) -> Iterator[Stop]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread inside the ``with`` block.

    The first signal is recorded in the yielded :class:`Stop`; a second one
    calls ``on_second(signum)`` (by default: kill this process's children) and
    ends the process at once (``os._exit(128 + signum)``). Outside the main
    thread (where handlers cannot be set) the block runs unchanged. The previous
    handlers come back at the end.
    """
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.signum is not None:
            if on_second is not None:
                with contextlib.suppress(Exception):
                    on_second(signum)
            os._exit(128 + signum)
        stop.signum = signum
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
