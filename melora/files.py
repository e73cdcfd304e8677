"""Files written whole or not at all, and file digests: what every other module writes with.

A run, an adapter or a checkpoint killed mid-write must leave the previous
file intact, so every writer goes through a temporary file in the same folder
and ``os.replace`` (atomic on POSIX and Windows). The bytes are made in memory
first and written by Python, so a full disk is an ``OSError(ENOSPC)`` here (not
a library's message about file positions): the temp file is removed and
:class:`DiskFull` names the folder and the space the write needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 50_000 else f"{n / 1e3:.1f} kB"


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free space on the file system of ``folder`` (its nearest existing parent), ``None`` when unknown."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


class DiskFull(OSError):
    """No space left on the device while writing ``what`` into ``folder``; ``needed``: the bytes the write needed.

    An ``OSError`` with ``errno.ENOSPC``, so code that handles a full disk as an
    ``OSError`` still does; its message is one line that says what to do.
    """

    def __init__(self, folder: str | os.PathLike, needed: int, what: str) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        self.folder, self.needed, self.what = Path(folder), int(needed), what
        self.free = free_bytes(folder)

    def __str__(self) -> str:
        free = f", {_megabytes(self.free)} free" if self.free is not None else ""
        return (
            f"no space left on device in {self.folder}: writing {self.what} needed {_megabytes(self.needed)}{free}; "
            "free some space there (or choose another runs_root=…) and rerun the same command: the files written "
            "before are intact, and an unfinished run resumes from its last checkpoint"
        )


def _write(f, data: bytes) -> None:
    """Write all of ``data`` to the open file ``f`` (one place for every file melora writes)."""
    f.write(data)
    f.flush()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (not atomically: for files inside a folder that is renamed into place whole).

    Raises:
        OSError: as ``open``/``write`` do; a partial file is removed.
    """
    path = Path(path)
    try:
        with open(path, "wb") as f:
            _write(f, data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str | None = None) -> None:
    """Write ``data`` via a temp file in the same folder and rename: readers never see half a file.

    Raises:
        DiskFull: the device is full (the temp file is removed, ``path`` is as it was);
            ``what`` names the write in the message (default: the file's name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write(f, data)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in DISK_FULL_ERRNOS and not isinstance(err, DiskFull):
            raise DiskFull(path.parent, len(data), what or path.name) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) via a temp file in the same folder and rename: readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def json_text(obj: Any) -> str:
    """``obj`` as indented JSON (tensors and numpy scalars as numbers), with a final newline."""
    return json.dumps(obj, indent=2, default=_jsonable) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (tensors and numpy scalars as numbers), atomically."""
    atomic_write_text(path, json_text(obj))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``tensors`` (detached, contiguous, on CPU) and string ``metadata``, atomically."""
    atomic_write_bytes(path, tensor_bytes(tensors, metadata))


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file of ``tensors`` (detached, contiguous, on CPU) and string ``metadata``."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
