"""Glue between Hydra configs and the library: adapter configs, run folders, seeding."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from melora.adapters.config import AdapterConfig, config_from_dict
from melora.train.records import config_hash, read_record
from melora.train.trainer import TrainerConfig

# Hydra-only keys of a method node, not adapter hyper-parameters.
_METHOD_META = ("name", "tag")
# Method fields given as a fraction of the total steps when < 1.
_STEP_FRACTIONS = ("tinit", "tfinal", "update_start_step")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def adapter_config(method: DictConfig | dict, total_steps: int | None = None) -> AdapterConfig:
    """The library config for a Hydra ``method`` node.

    Step-valued fields below 1 (``tinit``, ``tfinal``, ``update_start_step``)
    are fractions of ``total_steps``; AdaLoRA's ``total_step`` is filled in.
    """
    node = OmegaConf.to_container(method, resolve=True) if isinstance(method, DictConfig) else dict(method)
    fields = {k: v for k, v in node.items() if k not in _METHOD_META}
    for key in _STEP_FRACTIONS:
        value = fields.get(key)
        if value is not None and 0 < value < 1:
            if total_steps is None:
                raise ValueError(f"method.{key}={value} is a fraction of the run's steps; total_steps is needed")
            fields[key] = int(round(value * total_steps))
        elif value is not None:
            fields[key] = int(value)
    if node["name"] == "adalora":
        fields["total_step"] = total_steps
    return config_from_dict({"method": node["name"], **fields})


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    """Merge the task's schedule (epochs, lr, batch) into the ``trainer`` node."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    return TrainerConfig(epochs=cfg.task.epochs, lr=cfg.task.lr, batch_size=cfg.task.batch_size, **trainer)


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def check_run_dir(run_dir: Path, config: dict) -> dict | None:
    """The existing record when ``run_dir`` already holds this exact run.

    Raises:
        ValueError: ``run_dir`` holds a run with a different config.
    """
    record = read_record(run_dir)
    if record is None:
        return None
    if record.get("config_hash") != config_hash(config):
        raise ValueError(
            f"{run_dir} holds a run with a different config (hash {record.get('config_hash')} vs "
            f"{config_hash(config)}); remove it or choose another folder with hydra.run.dir=…"
        )
    return record
