"""Glue between Hydra configs and the library: adapter configs, run folders, seeding."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from melora.adapters.base import AdapterConfig, config_class
from melora.train.records import config_hash, move_aside, read_record
from melora.train.trainer import TrainerConfig

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parent

# Hydra-only keys of a method node, not adapter hyper-parameters.
_METHOD_META = ("name", "tag")


def adapter_config(method: DictConfig | dict, total_steps: int | None = None) -> AdapterConfig:
    """The library config for a Hydra ``method`` node of a run of ``total_steps`` steps.

    The method's step-valued fields below 1 (e.g. Delta-LoRA's
    ``update_start_step``) are fractions of ``total_steps``; a method that
    needs the run's length (AdaLoRA's ``total_step``) gets it.
    """
    node = OmegaConf.to_container(method, resolve=True) if isinstance(method, DictConfig) else dict(method)
    fields = {k: v for k, v in node.items() if k not in _METHOD_META}
    return config_class(node["name"]).for_run(fields, total_steps)


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    """Merge the task's schedule (epochs, lr, batch) into the ``trainer`` node."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    return TrainerConfig(epochs=cfg.task.epochs, lr=cfg.task.lr, batch_size=cfg.task.batch_size, **trainer)


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def check_run_dir(run_dir: Path, config: dict) -> dict | None:
    """The existing record when ``run_dir`` already holds this exact run.

    A damaged ``record.json`` counts as none (it is moved aside to
    ``record.json.damaged`` with a warning; the run resumes from its checkpoint
    or starts over). A completed run whose best adapter (``adapter/``) is
    damaged or missing is not complete any more: its record comes back with
    ``status: "damaged"`` (the damaged folder moved aside to
    ``adapter.damaged``), so the run entry resumes it and the trainer rewrites
    the adapter from the checkpoint or trains again.

    Raises:
        ValueError: ``run_dir`` holds a run with a different config.
    """
    from melora.train.checkpoint import ADAPTER_DIR, damaged_adapter

    main = _is_main_process()  # under accelerate launch, one process moves files
    record = read_record(run_dir, move_damaged=main)
    if record is None:
        return None
    if record.get("config_hash") != config_hash(config):
        raise ValueError(
            f"{run_dir} holds a run with a different config (hash {record.get('config_hash')} vs "
            f"{config_hash(config)}); remove it or choose another folder with hydra.run.dir=…"
        )
    adapter = Path(run_dir) / ADAPTER_DIR
    if record.get("status") == "completed":
        damage = damaged_adapter(adapter) if adapter.exists() else f"{adapter} is missing"
        if damage is not None:
            moved = move_aside(adapter) if main and adapter.exists() else None
            log.warning("%s%s; the completed run is resumed to restore it", damage, f" (moved aside to {moved.name})" if moved else "")
            return dict(record, status="damaged")
    return record


def _raised_by_melora(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in the melora package."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def cli_errors(main):
    """Decorator for a Hydra task function: a configuration error is one line, not a traceback.

    A ``ValueError`` (or ``FileNotFoundError``) raised by melora's own code
    (``method.n`` that does not divide the layers, an unknown ``scaling``, a
    run folder that holds another config, no adapter in ``adapter_dir``, …)
    ends the command with ``Error: <message>`` on one line of stderr and exit
    status 1; under ``-m`` Hydra reports it in one line and goes on with the
    sweep's other jobs. ``HYDRA_FULL_ERROR=1`` gives the full traceback; errors
    raised outside melora keep Hydra's usual report. Put it under ``@hydra.main``.
    """
    from hydra.errors import CompactHydraException

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ValueError, FileNotFoundError) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or not _raised_by_melora(err):
                raise
            message = "Error: " + " ".join(str(err).split("\n"))
            if _multirun():  # Hydra reports it and goes on with the sweep's other jobs
                raise CompactHydraException(message) from None
            print(message, file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapper
