"""Run records: one self-describing ``record.json`` per run, written atomically.

A record holds everything a table or figure needs without re-running anything:
the resolved config and its hash, the metrics of every evaluation, the best
metric and where it happened, parameter counts, equivalent rank, wall time,
peak memory, throughput, package versions, git commit and device.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RECORD_FILE = "record.json"
PACKAGES = ("melora", "torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "safetensors")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same folder and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


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
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
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


def read_record(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def iter_records(root: str | os.PathLike):
    """Every ``record.json`` below ``root``, with its folder under ``run_dir``."""
    for path in sorted(Path(root).rglob(RECORD_FILE)):
        record = json.loads(path.read_text())
        record["run_dir"] = str(path.parent)
        yield record
