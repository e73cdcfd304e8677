"""The run scaffold shared by every training entry point, and the glue between Hydra configs and the library.

``train_run(cfg, task)`` is one run: config → data → model → method →
trainer → record. The entry points (``melora.glue``, ``melora.instruct``) give
it a ``RunTask``: how to load their data and model, how to evaluate, and the
record fields only they know.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from omegaconf import DictConfig, OmegaConf

from melora.adapters.base import AdapterConfig, config_class
from melora.runs import config_hash, move_aside, read_record
from melora.train.runlock import exclusive_run
from melora.train.trainer import TrainerConfig

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR.parent / "configs"

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


@dataclass
class RunData:
    """What a task's data gives the scaffold.

    Attributes:
        train: Map-style training set of feature dicts.
        collate: Builds a batch from a list of features.
        evaluate: ``evaluate(model, accelerator) -> metrics``, every epoch (or ``eval_every``).
        main_metric: The metric that picks the best checkpoint.
        record: Record fields about the data (sizes, selection split, …).
        batching: The trainer's batching strategy (``melora.train.batching``); ``None``: its default.
        eval_data: Whatever ``RunTask.prepare`` needs of the evaluation data.
        write_predictions: ``write_predictions(run_dir, step, epoch)`` after each
            evaluation: keeps its per-example predictions (``None``: not kept).
    """

    train: Dataset
    collate: Callable
    evaluate: Callable
    main_metric: str
    record: dict[str, Any] = field(default_factory=dict)
    batching: Callable | None = None
    eval_data: Any = None
    write_predictions: Callable[[Path, int, int], None] | None = None


@dataclass
class RunTask:
    """What differs between GLUE and instruction tuning; everything else is ``train_run``.

    Attributes:
        kind: The record's ``kind`` (``"glue"``, ``"instruct"``).
        data: ``data(cfg, tokenizer, trainer_config) -> RunData``.
        model: ``model(cfg) -> nn.Module``, the base model (the seed is set before).
        prepare: ``prepare(model, data, existing_record) -> record fields``, after
            injection (e.g. adapters to fp32, the dev loss before training).
        record: Record fields from the config alone, after the method's.
    """

    kind: str
    data: Callable[[DictConfig, Any, TrainerConfig], RunData]
    model: Callable[[DictConfig], "nn.Module"]
    prepare: Callable[["nn.Module", RunData, dict | None], dict] | None = None
    record: Callable[[DictConfig], dict] | None = None

    def train(self, cfg: DictConfig) -> dict:
        """One run of this task in ``cfg.run_dir``: :func:`train_run`'s record."""
        return train_run(cfg, self)


@exclusive_run  # one process per run folder: another one skips it
def train_run(cfg: DictConfig, task: RunTask) -> dict:
    """Train one run of ``cfg`` in ``cfg.run_dir`` and return its record (``record.json``).

    A completed run is skipped (its record returned); an unfinished one resumes
    from its checkpoint (``resume=true``). The seed is set before the data is
    loaded and again before the model is built, so the initialisation depends
    on the seed only.

    Raises:
        ValueError: ``run_dir`` holds another config, or an unfinished run with ``resume=false``.
    """
    from accelerate.utils import set_seed

    from melora.adapters.base import get_method
    from melora.adapters.inject import inject
    from melora.files import atomic_write_text
    from melora.models import load_tokenizer
    from melora.train.loggers import make_logger
    from melora.train.trainer import Trainer, total_optimizer_steps

    run_dir = Path(cfg.run_dir)
    config = resolved(cfg)
    existing = check_run_dir(run_dir, config)
    if existing is not None and existing.get("status") == "completed":
        log.info("%s is already complete (best %s = %s); skipping", run_dir, cfg.task.metric, existing.get("best_metric"))
        return existing
    if existing is not None and existing.get("diverged"):
        log.info("%s diverged (%s); skipping: remove the folder to train it again", run_dir, existing.get("error"))
        return existing
    if existing is not None and not cfg.resume:
        raise ValueError(f"{run_dir} holds an unfinished run and resume=false; remove it or set resume=true")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    set_seed(cfg.seed)
    started = time.time()
    tokenizer = load_tokenizer(cfg.model)
    tcfg = trainer_config(cfg)
    data = task.data(cfg, tokenizer, tcfg)
    acfg = adapter_config(cfg.method, total_optimizer_steps(len(data.train), tcfg))

    set_seed(cfg.seed)  # the head and A init depend on the seed only, not on data loading
    model = inject(task.model(cfg), acfg, seed=cfg.seed)
    prepared = task.prepare(model, data, existing) if task.prepare else {}
    name = f"{cfg.task.name}/{cfg.model.name}/{cfg.method.tag}/seed{cfg.seed}"
    record = {
        "name": name,
        "kind": task.kind,
        "profile": cfg.profile.name,
        "task": cfg.task.name,
        "metric": cfg.task.metric,
        "model": cfg.model.name,
        "model_name_or_path": cfg.model.name_or_path,
        "method_tag": cfg.method.tag,
        "method_config": acfg.as_record(),
        "seed": cfg.seed,
        **(task.record(cfg) if task.record else {}),
        **data.record,
        **prepared,
        "config": config,
        "config_hash": config_hash(config),
        "started_at": started,
    }
    trainer = Trainer(
        model=model,
        method=get_method(acfg, seed=cfg.seed),
        train_dataset=data.train,
        collate_fn=data.collate,
        evaluate=data.evaluate,
        main_metric=data.main_metric,
        config=tcfg,
        run_dir=run_dir,
        record=record,
        seed=cfg.seed,
        resume=cfg.resume,
        logger=make_logger(OmegaConf.to_container(cfg.logger, resolve=True), run_dir, config, name),
        batching=data.batching,
        write_predictions=data.write_predictions,
    )
    return trainer.fit()


def entry_point(config_name: str, work: Callable[[DictConfig], dict], result: str = "best_metric") -> Callable[[], Any]:
    """The Hydra ``main`` of an entry point: ``work(cfg)`` on ``configs/<config_name>.yaml`` and the command line.

    A configuration error ends it in one line (``cli_errors``). It returns the
    record's ``result`` field, the number a Hydra sweeper optimising over runs reads.
    """
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    @cli_errors
    def main(cfg: DictConfig) -> Any:
        return work(cfg).get(result)

    return main
