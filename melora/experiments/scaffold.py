"""The run scaffold shared by every training entry point, and the glue between Hydra configs and the library.

``train_run(cfg, task)`` is one run: config → data → model → method →
trainer → record. The entry points (``melora.experiments.glue``, ``melora.experiments.instruct``) give
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
from melora.experiments.runs import config_differences, config_hash, move_aside, read_record
from melora.experiments.specs import CONFIGS, require_project
from melora.experiments.train.runlock import exclusive_run
from melora.experiments.train.trainer import TrainerConfig

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the melora package: its errors are the user's to fix
CONFIG_DIR = CONFIGS

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
    from melora.experiments.train.checkpoint import ADAPTER_DIR, damaged_adapter

    main = _is_main_process()  # under accelerate launch, one process moves files
    record = read_record(run_dir, move_damaged=main)
    if record is None:
        return None
    if record.get("config_hash") != config_hash(config):
        differences = config_differences(record["config"], config) if isinstance(record.get("config"), dict) else []
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        where = (" (the data folder is part of a run's identity: point MELORA_DATA_DIR at the recorded one to resume it)"
                 if any(d.startswith("data_dir=") for d in differences) else "")
        raise ValueError(
            f"{run_dir} holds a run with a different config ({shown or 'hash ' + str(record.get('config_hash')) + ' vs ' + config_hash(config)})"
            f"{where}; remove it or choose another folder with hydra.run.dir=…"
        )
    adapter = Path(run_dir) / ADAPTER_DIR
    if record.get("status") == "completed":
        damage = damaged_adapter(adapter) if adapter.exists() else f"{adapter} is missing"
        if damage is not None:
            moved = move_aside(adapter) if main and adapter.exists() else None
            log.warning("%s%s; the completed run is resumed to restore it", damage, f" (moved aside to {moved.name})" if moved else "")
            return dict(record, status="damaged")
    return record


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _entry_module() -> str:
    """The ``-m`` module this process runs (``melora.experiments.glue``, ``melora.experiments.instructeval``, …)."""
    path = Path(sys.argv[0]).resolve()
    if path.is_relative_to(PACKAGE_DIR.parent) and path.suffix == ".py":
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__main__" else parts)
    return "melora.experiments.glue"


def interrupted_run(cfg: DictConfig | None) -> str:
    """The summary line of a run stopped by Ctrl-C or SIGTERM: where it stopped, what is kept, and the command that resumes."""
    from melora.experiments.cli import resume_command
    from melora.experiments.runs import EVAL_RECORD, read_json_object
    from melora.experiments.train.checkpoint import checkpoint_folder

    command = resume_command(_entry_module())
    run_dir = Path(cfg.run_dir) if cfg is not None and OmegaConf.select(cfg, "run_dir") else None
    if run_dir is None:
        return f"interrupted before the run started; rerun the same command to start it: {command}"
    record = read_record(run_dir)
    if record is not None and record.get("status") == "completed":
        return f"interrupted after {run_dir} completed: its record and adapter are complete, nothing to resume"
    if (run_dir / EVAL_RECORD).is_file():
        try:
            done = list(read_json_object(run_dir / EVAL_RECORD).get("results", {}))
        except (OSError, ValueError):
            done = []
        return (f"interrupted: the evaluation in {run_dir} finished {', '.join(done) or 'no benchmark'}; "
                f"rerun the same command to resume at the next benchmark: {command}")
    state = checkpoint_folder(run_dir) / "state.json"
    try:
        step = read_json_object(state)["global_step"]
    except (OSError, ValueError, KeyError):
        return f"interrupted: {run_dir} stopped before its first checkpoint; rerun the same command to start it again: {command}"
    total = f" of {record['total_steps']}" if record is not None and record.get("total_steps") else ""
    return (f"interrupted: {run_dir} stopped; its last checkpoint (step {step}{total}) and record are kept: "
            f"rerun the same command to resume from it: {command}")


def _no_tqdm_process_lock() -> None:
    """Keep tqdm from creating its multiprocessing lock in a sweep's worker process.

    A lock made in the worker is shared with no other process, and it is a named
    semaphore registered with the resource tracker: when Ctrl-C kills the worker,
    the tracker reports it as leaked.
    """
    from tqdm.std import TqdmDefaultWriteLock

    if not hasattr(TqdmDefaultWriteLock, "mp_lock"):
        TqdmDefaultWriteLock.mp_lock = None


def cli_errors(main):
    """Decorator for a Hydra task function: an error the user can fix is one line, not a traceback; Ctrl-C stops cleanly.

    A ``ValueError`` (or ``FileNotFoundError``) raised by melora's own code
    (``method.n`` that does not divide the layers, an unknown ``scaling``, a
    run folder that holds another config, no adapter in ``adapter_dir``, a
    damaged file, …) and a full disk end the command with ``Error: <message>``
    on one line of stderr and exit status 1 (:func:`melora.experiments.cli.error_line`);
    under ``-m`` Hydra reports it in one line and goes on with the sweep's
    other jobs. ``HYDRA_FULL_ERROR=1`` gives the full traceback; errors raised
    outside melora keep Hydra's usual report.

    Outside a multirun, SIGINT (Ctrl-C) and SIGTERM stop the run at once
    (:func:`melora.experiments.cli.stop_signals`; a second one ends the process without
    waiting): the last checkpoint and the record stay as they were written, and
    one line says where the run stopped and the command that resumes it (exit
    status 130, 143 for SIGTERM). In a multirun the sweep handles them
    (:func:`melora.experiments.sweep.sweep_specs`). Put it under ``@hydra.main``.
    """
    from hydra.errors import CompactHydraException

    from melora.experiments.cli import error_line, exit_on_user_error, stop_signals

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if _multirun():
            _no_tqdm_process_lock()
            try:
                return main(*args, **kwargs)
            except (ValueError, OSError) as err:
                line = error_line(err)
                if line is None:
                    raise
                raise CompactHydraException(line) from None  # Hydra reports it and goes on with the sweep's other jobs
        with stop_signals() as stop:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(interrupted_run(args[0] if args else None), file=sys.stderr, flush=True)
                raise SystemExit(stop.status) from None
            except (ValueError, OSError) as err:
                exit_on_user_error(err)
                raise

    return wrapper


_ABSENT = object()


def check_number(cfg: DictConfig, key: str, minimum: float, *, integer: bool = True, nullable: bool = False,
                  maximum: float | None = None, above: bool = False, example: str = "") -> None:
    """Raise the one-line ``ValueError`` for setting ``key`` of ``cfg`` outside ``[minimum, maximum]`` (``above``: ``> minimum``).

    An absent setting passes; ``nullable``: so does ``null``.
    """
    import math

    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is _ABSENT or (value is None and nullable):
        return
    kind = (int,) if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > minimum if above else value >= minimum) and (maximum is None or value <= maximum):
        return
    what = "a whole number" if integer else "a number"
    bounds = f"between {minimum:g} and {maximum:g}" if maximum is not None else f"{'above' if above else 'at least'} {minimum:g}"
    raise ValueError(f"{key}={value} is invalid: it must be {'null or ' if nullable else ''}{what}, {bounds}{f' (e.g. {example})' if example else ''}")


def supported_precisions() -> list[str]:
    """The ``trainer.mixed_precision`` values this machine can train with (``auto`` picks one of them)."""
    import torch
    from accelerate.utils import is_bf16_available, is_fp8_available

    out = ["auto", "no"]
    if is_bf16_available():
        out.append("bf16")
    out.append("fp16")  # accelerate runs fp16 autocast on every device it supports
    if torch.cuda.is_available() and is_fp8_available():
        out.append("fp8")
    return out


def _check_model(model: DictConfig) -> None:
    """A model config that can load: a known source, a local folder with a config, an installed package, a known dtype."""
    from melora.experiments.models import DTYPES, _package_dir, _package_file, cache_root

    source = model.get("source", "hub")
    if source not in ("hub", "path", "package"):
        raise ValueError(f"model.source={source} is unknown; choose one of hub, path, package")
    if source == "path":
        folder = Path(str(model.name_or_path)).expanduser()
        if not folder.is_dir():
            raise ValueError(f"model.name_or_path={folder} is not a folder: with model.source=path give a folder written by "
                             "save_pretrained (holding config.json), or use an offline model config such as model=minilm")
        if not (folder / "config.json").is_file():
            raise ValueError(f"model.name_or_path={folder} holds no config.json: give a folder written by save_pretrained "
                             "(make check-paper builds one with the paper models' shapes)")
    elif source == "package" and not (cache_root() / str(model.get("name")) / ".complete").exists():
        try:
            if model.get("zip_parts"):
                for part in model.zip_parts:
                    _package_file(part["package"], part["file"])
            else:
                _package_dir(model.package)
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise ValueError(f"model={model.get('name')}: {err}") from err
    dtype = model.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype} is unknown; choose one of {', '.join(DTYPES)}")


def validate_config(cfg: DictConfig) -> None:
    """Check a run's trainer, task and model settings before any data or model loads (an entry point adds its own: ``entry_point(check=…)``).

    Every check names the setting, its value and the fix on one line: a learning
    rate above 0, whole epochs, batch sizes and lengths of at least 1, a mixed
    precision this machine supports, a model folder that exists and holds a
    config, an installed model package. Returns nothing.

    Raises:
        ValueError: the first setting no run can use.
    """
    if "task" in cfg:
        check_number(cfg, "task.lr", 0, integer=False, above=True, example="task.lr=4e-4")
        check_number(cfg, "task.epochs", 1, example="task.epochs=3")
        for key in ("task.batch_size", "task.micro_batch_size", "task.eval_batch_size", "task.max_length", "task.cutoff_len", "task.dev_size"):
            check_number(cfg, key, 1, example=f"{key}=8")
        for key in ("task.max_train_samples", "task.max_eval_samples", "task.max_dev_samples", "task.eval_every"):
            check_number(cfg, key, 1, nullable=True, example=f"{key}=null")
        check_number(cfg, "task.warmup_steps", 0, example="task.warmup_steps=0")
    if "trainer" in cfg:
        for key in ("trainer.per_device_batch_size", "trainer.max_steps", "trainer.eval_every"):
            check_number(cfg, key, 1, nullable=True, example=f"{key}=null")
        check_number(cfg, "trainer.warmup_steps", 0, nullable=True, example="trainer.warmup_steps=null")
        check_number(cfg, "trainer.warmup_ratio", 0, integer=False, maximum=1, example="trainer.warmup_ratio=0.06")
        check_number(cfg, "trainer.weight_decay", 0, integer=False, example="trainer.weight_decay=0.1")
        check_number(cfg, "trainer.max_grad_norm", 0, integer=False, nullable=True, example="trainer.max_grad_norm=1.0")
        check_number(cfg, "trainer.log_every", 1, example="trainer.log_every=10")
        check_number(cfg, "trainer.num_workers", 0, example="trainer.num_workers=0")
        precision, supported = str(cfg.trainer.get("mixed_precision", "auto")), supported_precisions()
        if precision not in supported:
            raise ValueError(f"trainer.mixed_precision={precision} is not supported on this machine; choose one of {', '.join(supported)} "
                             "(auto: bf16 or fp16 on a GPU, no on a CPU)")
        per_device = OmegaConf.select(cfg, "trainer.per_device_batch_size")
        batch = OmegaConf.select(cfg, "task.batch_size")
        if per_device and batch and batch % per_device:
            raise ValueError(f"task.batch_size={batch} is not a multiple of the micro-batch trainer.per_device_batch_size={per_device}; "
                             "change one of them")
    if "model" in cfg:
        _check_model(cfg.model)


def _group_options(loader, group: str) -> list[str]:
    """Every option of config group ``group`` (nested groups as ``glue/rte``); empty when ``group`` is no group."""
    options = list(loader.get_group_options(group))
    for sub in loader.list_groups(group):
        options += [f"{sub}/{o}" for o in _group_options(loader, f"{group}/{sub}")]
    return sorted(options)


def check_overrides(overrides: list[str]) -> None:
    """Check the config-group choices among command-line ``overrides`` (``task=glue/foo``) before Hydra composes.

    Hydra's own message for an unknown option does not list the nested ones
    (the tasks); this one does, on one line. Values, flags and overrides Hydra
    cannot parse are left to Hydra. Returns nothing.

    Raises:
        ValueError: an option that does not exist, with the ones that do.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parsed += parser.parse_overrides([arg])
        except Exception:  # Hydra reports a malformed override itself
            continue
    parsed = [o for o in parsed if not o.is_delete() and "." not in o.key_or_group]
    if not parsed:
        return
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for override in parsed:
            group = override.key_or_group
            options = _group_options(loader, group)
            if not options:
                continue
            try:
                values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
            except Exception:
                continue
            for value in values:
                if value in options or value == "null":
                    continue
                prefix = value.split("/")[0] + "/"
                near = [o for o in options if o.startswith(prefix)] if "/" in value else []
                where = f" (the files in configs/{group}/)" if not group.startswith("hydra") else ""
                raise ValueError(f"{group}={value} is unknown; choose one of {', '.join(near or options)}{where}")


@dataclass
class RunData:
    """What a task's data gives the scaffold.

    Attributes:
        train: Map-style training set of feature dicts.
        collate: Builds a batch from a list of features.
        evaluate: ``evaluate(model, accelerator) -> metrics``, every epoch (or ``eval_every``).
        main_metric: The metric that picks the best checkpoint.
        record: Record fields about the data (sizes, selection split, …).
        batching: The trainer's batching strategy (``melora.experiments.train.batching``); ``None``: its default.
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
    from melora.experiments.models import load_tokenizer
    from melora.experiments.train.loggers import make_logger
    from melora.experiments.train.trainer import Trainer, total_optimizer_steps
    from melora.files import atomic_write_text

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


def entry_point(config_name: str, work: Callable[[DictConfig], dict], result: str = "best_metric",
                check: Callable[[DictConfig], None] | None = None) -> Callable[[], Any]:
    """The Hydra ``main`` of an entry point: ``work(cfg)`` on ``configs/<config_name>.yaml`` and the command line.

    An unknown config-group option (``task=glue/foo``) is reported before Hydra
    composes (:func:`check_overrides`), an invalid setting before any data or
    model loads (:func:`validate_config`), each in one line (``cli_errors``);
    Ctrl-C ends a run with a summary line. It returns the record's ``result``
    field, the number a Hydra sweeper optimising over runs reads.
    """
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    @cli_errors
    def hydra_main(cfg: DictConfig) -> Any:
        validate_config(cfg)  # before any data or model loads
        if check is not None:  # the entry point's own settings
            check(cfg)
        return work(cfg).get(result)

    def main() -> Any:
        from melora.experiments.cli import debugging

        if not debugging():  # HYDRA_FULL_ERROR=1: Hydra's own report, with its traceback
            try:
                require_project()
                check_overrides(sys.argv[1:])
            except (ValueError, FileNotFoundError) as err:
                print(f"Error: {err}", file=sys.stderr, flush=True)
                raise SystemExit(1) from None
        return hydra_main()

    return main
