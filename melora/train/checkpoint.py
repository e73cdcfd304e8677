"""Training checkpoints that let a killed run continue exactly where it stopped.

``<run_dir>/checkpoint/`` holds::

    adapter.safetensors    every trainable tensor (adapter, modules_to_save, Delta-LoRA's moved W)
    optimizer.pt           optimizer state (plain tensors; loaded with weights_only=True)
    rng.safetensors        torch CPU / CUDA generator states
    state.json             step, epoch, best metric, history, scheduler, python/numpy RNG

Written into a temp folder and renamed, so a kill during the write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from melora.adapters.io import adapter_state_dict
from melora.train.records import atomic_write_json

CHECKPOINT_DIR = "checkpoint"


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


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, process_tag: str = "") -> None:
    """Write the checkpoint of ``model`` (unwrapped) and the training state."""
    final = Path(run_dir) / CHECKPOINT_DIR
    tmp = Path(run_dir) / f".{CHECKPOINT_DIR}.tmp{process_tag}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}, str(tmp / "adapter.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_file({k: v.contiguous() for k, v in _rng_tensors().items()}, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    np_state = np.random.get_state()
    full = dict(
        state,
        scheduler=scheduler.state_dict(),
        python_rng=[py_state[0], list(py_state[1]), py_state[2]],
        numpy_rng=[np_state[0], np_state[1].tolist(), *[x.item() if hasattr(x, "item") else x for x in np_state[2:]]],
    )
    atomic_write_json(tmp / "state.json", full)
    old = Path(run_dir) / f".{CHECKPOINT_DIR}.old{process_tag}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / "state.json").is_file()


def load_checkpoint(run_dir: Path, model, optimizer, scheduler) -> dict:
    """Restore ``model`` (unwrapped), optimizer, scheduler and RNGs; return the training state."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "adapter.safetensors"))
    own = adapter_state_dict(model)
    if set(own) != set(tensors):
        raise ValueError(f"checkpoint in {folder} does not match this model/config; delete it or change run_dir")
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(tensors[key])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(state.pop("scheduler"))
    _restore_rng(load_file(str(folder / "rng.safetensors")), state)
    state.pop("python_rng"), state.pop("numpy_rng")
    return state
