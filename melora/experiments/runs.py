"""The run-record store: one self-describing ``record.json`` per run, written atomically.

Training (``melora.experiments.scaffold``), INSTRUCTEVAL, the sweeper and the report all
read and write runs through this module.

A record holds everything a table or figure needs without re-running anything:
the resolved config and its hash, the metrics of every evaluation, the best
metric and where it happened, parameter counts, equivalent rank, wall time,
peak memory, throughput, package versions, git commit and device.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RECORD_FILE = "record.json"
EVAL_RECORD = "eval_record.json"  # an INSTRUCTEVAL evaluation, in its own folder or in the training run's
DAMAGED_SUFFIX = ".damaged"  # a damaged file or folder is renamed <name>.damaged, kept as evidence
log = logging.getLogger(__name__)
PACKAGES = ("melora", "torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "safetensors")


# Settings that change how a run is shown or stored, not what it computes.
_COSMETIC = ("run_dir", "resume", "logger", "hydra", "cache_dir", "runs_root")
_COSMETIC_TRAINER = ("progress", "log_every", "num_workers")


def config_hash(config: dict) -> str:
    """Identity of a run: a hash of its resolved config minus where and how it is shown."""
    keep = {k: v for k, v in config.items() if k not in _COSMETIC}
    # Selecting on dev was the only protocol before `selection` existed: leaving it
    # out keeps the identity of every run recorded before then.
    if isinstance(keep.get("selection"), dict) and keep["selection"].get("split") == "dev":
        del keep["selection"]
    if isinstance(keep.get("trainer"), dict):
        keep["trainer"] = {k: v for k, v in keep["trainer"].items() if k not in _COSMETIC_TRAINER}
        # trainer.compile came later: left off, it keeps the identity of every run recorded before then.
        if keep["trainer"].get("compile") is False:
            del keep["trainer"]["compile"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(recorded: dict, config: dict, prefix: str = "") -> list[str]:
    """The settings where two resolved configs differ, as ``"task.lr=0.001 (recorded) vs 0.003"`` (cosmetic keys left out)."""
    out = []
    for key in sorted(set(recorded) | set(config)):
        if not prefix and key in _COSMETIC:
            continue
        a, b = recorded.get(key, "<unset>"), config.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}={a} (recorded) vs {b}")
    return out


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def git_commit() -> str | None:
    """HEAD of the checkout this package runs from (``-dirty`` with uncommitted changes); None outside git.

    Read once per process: a sweep's worker process trains many runs with the code it
    imported at its first, so a later commit must not be recorded as theirs.
    """
    root = Path(__file__).resolve().parent  # git finds the work tree from any folder inside it
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        try:
            model = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
            info["cpu"] = model.split(":", 1)[1].strip()
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
    return info


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def move_aside(path: str | os.PathLike) -> Path | None:
    """Rename the damaged file or folder ``path`` to ``<name>.damaged`` (``.damaged.1``, … when taken).

    The evidence is kept, out of the way of the run. Returns the new path, or
    ``None`` when ``path`` is gone already (another process moved it).
    """
    path = Path(path)
    target, k = path.with_name(path.name + DAMAGED_SUFFIX), 1
    while target.exists():
        target, k = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{k}"), k + 1
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    return target


_warned: set[str] = set()  # damaged records already reported by this process


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``.

    Raises:
        ValueError: the file is not a complete JSON object (truncated, corrupt, not UTF-8).
    """
    value = json.loads(Path(path).read_text())  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(value, dict):
        raise ValueError(f"holds a JSON {type(value).__name__}, not an object")
    return value


def read_record(run_dir: str | os.PathLike, move_damaged: bool = False) -> dict | None:
    """The run's record, or ``None`` when it has none.

    A damaged ``record.json`` (truncated, corrupt) counts as none, with a
    one-line warning naming it (once per process); ``move_damaged`` also renames
    it to ``record.json.damaged``, so the run can start over (the run entry does
    this, holding the run's lock; readers only skip it).
    """
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return read_json_object(path)
    except FileNotFoundError:
        return None  # moved aside by another process meanwhile
    except ValueError as err:
        if move_damaged:
            moved = move_aside(path)
            log.warning("%s is damaged (%s); moved aside to %s", path, err, moved.name if moved else "?")
        elif str(path) not in _warned:
            _warned.add(str(path))
            log.warning("%s is damaged (%s); skipping it", path, err)
        return None


def iter_records(root: str | os.PathLike):
    """Every ``record.json`` below ``root``, with its folder under ``run_dir``; damaged ones are skipped with a warning.

    Symbolic links to run folders are followed: a study that reuses another
    folder's runs links to them rather than holding copies.
    """
    found = [Path(folder) / RECORD_FILE for folder, _, files in os.walk(root, followlinks=True) if RECORD_FILE in files]
    for path in sorted(found):
        record = read_record(path.parent)
        if record is None:
            continue
        record["run_dir"] = str(path.parent)
        yield record
