"""Training checkpoints that let a killed run continue exactly where it stopped.

``<run_dir>/checkpoint/`` holds::

    adapter.safetensors    every trainable tensor (adapter, modules_to_save, Delta-LoRA's moved W)
    optimizer.pt           optimizer state (plain tensors; loaded with weights_only=True)
    rng.safetensors        torch CPU / CUDA generator states
    state.json             step, epoch, best metric, history, scheduler, python/numpy RNG

Written into a temp folder and renamed, so a kill during the write leaves the
previous checkpoint intact (a kill between the two renames leaves it as
``.checkpoint.old``, which is read then). A full disk raises
:class:`melora.files.DiskFull` (the folder and the checkpoint's size) and changes nothing.

On resume (:func:`inspect_resume`, then :func:`apply_resume`) a damaged
checkpoint (a truncated or unreadable file) is moved aside to
``checkpoint.damaged`` with a one-line warning naming the file, and the run
starts from scratch. So is a damaged best adapter (``adapter/``): it is
rewritten from the checkpoint when the checkpoint is of the best evaluation,
otherwise the run starts from scratch.
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from melora.adapters.io import CONFIG_FILE, WEIGHTS_FILE, adapter_state_dict, save_adapter
from melora.experiments.runs import move_aside, read_json_object
from melora.files import DISK_FULL_ERRNOS, DiskFull, free_bytes, json_text, tensor_bytes, write_bytes

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"  # the best adapter the trainer keeps next to the checkpoint
STATE_KEYS = ("global_step", "history", "best_metric", "best_step", "scheduler", "python_rng", "numpy_rng")

log = logging.getLogger(__name__)


class DamagedFile(ValueError):
    """A file a run needs is truncated or unreadable; ``path`` names it, ``fix`` (optional) what to do."""

    def __init__(self, path: Path, reason: str, fix: str | None = None) -> None:
        super().__init__(f"{path} is damaged ({reason})" + (f"; {fix}" if fix else ""))
        self.path, self.reason = Path(path), reason


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = state
    return out


def _restore_rng(tensors: dict[str, torch.Tensor], state: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate((state["python_rng"][0], tuple(state["python_rng"][1]), state["python_rng"][2]))
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _checkpoint_files(model, optimizer, scheduler, state: dict) -> dict[str, bytes]:
    """The checkpoint's files, made in memory: their sizes are known before anything is written."""
    optimizer_bytes = io.BytesIO()
    torch.save(optimizer.state_dict(), optimizer_bytes)
    py_state = random.getstate()
    np_state = np.random.get_state()
    full = dict(
        state,
        scheduler=scheduler.state_dict(),
        python_rng=[py_state[0], list(py_state[1]), py_state[2]],
        numpy_rng=[np_state[0], np_state[1].tolist(), *[x.item() if hasattr(x, "item") else x for x in np_state[2:]]],
    )
    return {
        "adapter.safetensors": tensor_bytes(adapter_state_dict(model)),
        "optimizer.pt": optimizer_bytes.getvalue(),
        "rng.safetensors": tensor_bytes(_rng_tensors()),
        "state.json": json_text(full).encode("utf-8"),
    }


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, process_tag: str = "") -> None:
    """Write the checkpoint of ``model`` (unwrapped) and the training state.

    Raises:
        DiskFull: the device has no room for it; the previous checkpoint is
            untouched and the temp folder removed (the message names the run
            folder and the checkpoint's size).
    """
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / f".{CHECKPOINT_DIR}.tmp{process_tag}"
    old = run_dir / f".{CHECKPOINT_DIR}.old{process_tag}"
    files = _checkpoint_files(model, optimizer, scheduler, state)
    needed = sum(len(data) for data in files.values())
    what = f"the checkpoint ({CHECKPOINT_DIR}/)"
    if tmp.exists():
        shutil.rmtree(tmp)
    free = free_bytes(run_dir)
    if free is not None and free < needed:
        raise DiskFull(run_dir, needed, what)
    try:
        tmp.mkdir(parents=True)
        for name, data in files.items():
            write_bytes(tmp / name, data)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            raise DiskFull(run_dir, needed, what) from err
        raise
    if final.exists():
        if old.exists():  # left by a save stopped after its swap: checkpoint/ is the newer one
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_folder(run_dir: Path) -> Path:
    """The folder the run's checkpoint is read from: ``checkpoint/``, or ``.checkpoint.old`` when a save stopped between its renames."""
    final = Path(run_dir) / CHECKPOINT_DIR
    old = Path(run_dir) / f".{CHECKPOINT_DIR}.old"
    if not final.exists() and (old / "state.json").is_file():
        return old
    return final


def has_checkpoint(run_dir: Path) -> bool:
    return (checkpoint_folder(run_dir) / "state.json").is_file()


@dataclass
class _Checkpoint:
    """The files of a checkpoint folder, read and checked, not yet applied."""

    folder: Path
    state: dict
    tensors: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict[str, torch.Tensor]


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def read_checkpoint(run_dir: Path) -> _Checkpoint:
    """Read every file of ``run_dir``'s checkpoint, changing nothing.

    Raises:
        DamagedFile: a file is missing, truncated or unreadable.
    """
    folder = checkpoint_folder(run_dir)

    def read(name: str, loader):
        path = folder / name
        try:
            return loader(path)
        except Exception as err:  # safetensors, JSON, pickle/zip and I/O errors all mean the same here
            raise DamagedFile(path, _reason(err)) from err

    state = read("state.json", read_json_object)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise DamagedFile(folder / "state.json", f"no {', '.join(missing)}")
    tensors = read("adapter.safetensors", lambda p: load_file(str(p)))
    optimizer = read("optimizer.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu"))
    rng = read("rng.safetensors", lambda p: load_file(str(p)))
    if "torch_cpu" not in rng:
        raise DamagedFile(folder / "rng.safetensors", "no torch_cpu state")
    return _Checkpoint(folder, state, tensors, optimizer, rng)


def _apply(ckpt: _Checkpoint, model, optimizer, scheduler) -> dict:
    own = adapter_state_dict(model)
    if set(own) != set(ckpt.tensors) or any(own[k].shape != ckpt.tensors[k].shape for k in own):
        raise ValueError(f"checkpoint in {ckpt.folder} does not match this model/config; delete it or change run_dir")
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(ckpt.tensors[key])
    optimizer.load_state_dict(ckpt.optimizer)
    state = dict(ckpt.state)
    scheduler.load_state_dict(state.pop("scheduler"))
    _restore_rng(ckpt.rng, state)
    state.pop("python_rng"), state.pop("numpy_rng")
    return state


def damaged_adapter(directory: Path) -> DamagedFile | None:
    """Why the adapter folder ``directory`` (``melora.save_adapter``'s) cannot be loaded, or ``None``.

    Checks that both files are there and complete (the safetensors header and
    size, the JSON), without reading the tensors.
    """
    from safetensors import safe_open

    directory = Path(directory)
    try:
        read_json_object(directory / CONFIG_FILE)
    except Exception as err:
        return DamagedFile(directory / CONFIG_FILE, _reason(err))
    try:
        with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
            f.keys()
    except Exception as err:
        return DamagedFile(directory / WEIGHTS_FILE, _reason(err))
    return None


@dataclass
class ResumePlan:
    """Where a run continues from, decided from its files before anything is changed.

    Every process of a multi-process run reads the same files into the same plan;
    only the main process then moves damaged files aside (:func:`apply_resume`).
    """

    run_dir: Path
    checkpoint: _Checkpoint | None = None  # None: start from scratch
    rewrite_adapter: bool = False  # the best adapter is lost but the checkpoint is of the best evaluation
    move: list[tuple[Path, str]] = field(default_factory=list)  # damaged files/folders to move aside, and why
    warnings: list[str] = field(default_factory=list)


def inspect_resume(run_dir: Path) -> ResumePlan:
    """Read ``run_dir``'s checkpoint and best adapter and decide where the run continues from."""
    run_dir = Path(run_dir)
    plan = ResumePlan(run_dir)
    adapter = run_dir / ADAPTER_DIR
    damage = damaged_adapter(adapter) if adapter.exists() else None
    adapter_ok = adapter.exists() and damage is None
    if damage is not None:
        plan.move.append((adapter, str(damage)))
    if not has_checkpoint(run_dir):
        return plan
    try:
        ckpt = read_checkpoint(run_dir)
    except DamagedFile as err:
        plan.move.append((checkpoint_folder(run_dir), f"{err}; training from scratch"))
        return plan
    state = ckpt.state
    if state["best_step"] is not None and not adapter_ok:
        if state["best_step"] != state["global_step"]:
            plan.warnings.append(
                f"the best adapter (step {state['best_step']}) of {run_dir} is lost and the checkpoint is of step "
                f"{state['global_step']}; training from scratch"
            )
            return plan
        plan.rewrite_adapter = True
        plan.warnings.append(f"the best adapter of {run_dir} is lost; rewriting it from the checkpoint (step {state['global_step']}, the best)")
    plan.checkpoint = ckpt
    return plan


def apply_resume(plan: ResumePlan, model, optimizer, scheduler, is_main: bool = True) -> dict | None:
    """Carry out ``plan``: the restored training state, or ``None`` to start from scratch.

    On the main process, logs the plan's warnings, moves damaged files aside and
    rewrites a lost best adapter from the checkpoint.
    """
    if is_main:
        for path, why in plan.move:
            moved = move_aside(path)
            log.warning("%s (%s/ moved aside to %s)", why, path.name, moved.name if moved else "?")
        for message in plan.warnings:
            log.warning(message)
    if plan.checkpoint is None:
        return None
    state = _apply(plan.checkpoint, model, optimizer, scheduler)
    if plan.rewrite_adapter and is_main:
        save_adapter(model, plan.run_dir / ADAPTER_DIR)
    return state
