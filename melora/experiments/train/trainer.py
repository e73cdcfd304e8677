"""One trainer for every experiment, on Accelerate.

AdamW on the trainable parameters only, a linear schedule with warm-up,
gradient accumulation (global batch = per-device batch × accumulation ×
processes), mixed precision where the device supports it, gradient clipping,
evaluation every epoch (or every ``eval_every`` steps) with best-checkpoint
selection on the task metric, the adapter methods' hooks, deterministic data
order, a checkpoint at every evaluation, and a run record. Runs unchanged under
``accelerate launch`` on several processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from melora.adapters.base import AdapterMethod
from melora.adapters.inject import describe, get_config
from melora.adapters.io import save_adapter
from melora.experiments.runs import RECORD_FILE, device_info, git_commit, package_versions, peak_memory_mb
from melora.experiments.train.batching import EpochBatches, EpochShuffle
from melora.experiments.train.checkpoint import apply_resume, inspect_resume, save_checkpoint
from melora.experiments.train.loggers import NullLogger
from melora.files import atomic_write_json


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


@dataclass
class TrainerConfig:
    """Optimisation settings (the Hydra ``trainer`` node plus the task's schedule).

    Attributes:
        epochs: Passes over the training set.
        lr: Peak learning rate of AdamW.
        batch_size: Global batch (per device × accumulation × processes).
        per_device_batch_size: Micro-batch per process; ``None``: the global batch.
        weight_decay: AdamW decay on weight matrices (not biases / norms).
        warmup_ratio: Linear warm-up as a fraction of all steps (if ``warmup_steps`` is unset).
        warmup_steps: Linear warm-up in steps (overrides the ratio).
        max_grad_norm: Gradient clipping; ``0`` or ``None`` disables it.
        mixed_precision: ``auto`` (bf16 on GPUs that have it, fp16 on other GPUs,
            none on CPU), ``no``, ``bf16`` or ``fp16``.
        eval_every: Evaluate (and checkpoint) every this many optimiser steps;
            ``None``: once per epoch.
        max_steps: Stop after this many optimiser steps (``None``: ``epochs``).
        greater_is_better: Whether a larger main metric is better.
        log_every: Steps between logged training losses.
        progress: Show a progress bar.
        group_by_length: Build each micro-batch from examples of similar length
            (less padding: faster on CPUs, where compute follows the padded
            length). The order stays random and depends only on the seed and epoch.
        compile: ``torch.compile`` the model (in place, inductor, graph breaks
            allowed) after ``accelerator.prepare``. ``False``, the default,
            leaves a run's config hash what it was before this option existed.
    """

    epochs: int = 3
    lr: float = 4e-4
    batch_size: int = 32
    per_device_batch_size: int | None = None
    weight_decay: float = 0.1
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    eval_every: int | None = None
    max_steps: int | None = None
    greater_is_better: bool = True
    log_every: int = 10
    progress: bool = True
    num_workers: int = 0
    group_by_length: bool = False
    compile: bool = False


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def total_optimizer_steps(num_examples: int, cfg: TrainerConfig) -> int:
    """Optimiser steps of a run (AdaLoRA's ``total_step`` needs it before injection)."""
    steps = math.ceil(num_examples / cfg.batch_size) * cfg.epochs
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


@dataclass
class Trainer:
    """Trains ``model`` (already injected) and writes ``<run_dir>/record.json``.

    Args:
        model: Model with adapters; ``model(**batch)`` must return ``.loss``.
        method: The adapter method (``melora.get_method``) whose hooks run each step.
        train_dataset: Map-style dataset of feature dicts.
        collate_fn: Builds a batch from a list of features.
        batching: The batching strategy, ``batching(per_device) -> batch
            sampler`` with ``use_epoch(epoch)`` (``melora.experiments.train.batching``);
            ``None``: a new permutation per epoch (``EpochShuffle``),
            length-grouped if ``config.group_by_length``.
        evaluate: ``evaluate(model, accelerator) -> dict`` of metrics, called on
            every process (gather inside).
        main_metric: Key of ``evaluate``'s dict used to pick the best checkpoint.
        config: Optimisation settings.
        run_dir: Where the record, adapter and checkpoint go.
        record: Fields for the record (resolved config, task, method, …).
        seed: Data order and hooks' seed.
        resume: Continue from ``run_dir/checkpoint`` when present.
        logger: Metric logger (wandb or none).
        write_predictions: ``write_predictions(run_dir, step, epoch)``, called on the
            main process after each evaluation, before the checkpoint (a resumed
            run evaluates that step again and replaces them).
    """

    model: torch.nn.Module
    method: AdapterMethod
    train_dataset: Dataset
    collate_fn: Callable
    evaluate: Callable[[torch.nn.Module, Any], dict[str, float]]
    main_metric: str
    config: TrainerConfig
    run_dir: Path
    record: dict = field(default_factory=dict)
    seed: int = 0
    resume: bool = True
    logger: NullLogger = field(default_factory=NullLogger)
    batching: Callable[[int], Sampler[list[int]]] | None = None
    write_predictions: Callable[[Path, int, int], None] | None = None

    def _accelerator(self):
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision=resolve_mixed_precision(self.config.mixed_precision))
        per_device = self.config.per_device_batch_size or self.config.batch_size // accelerator.num_processes
        micro_global = per_device * accelerator.num_processes
        if self.config.batch_size % micro_global:
            raise ValueError(
                f"batch_size={self.config.batch_size} is not a multiple of per_device_batch_size={per_device} × "
                f"{accelerator.num_processes} processes; change trainer.per_device_batch_size"
            )
        accelerator.gradient_accumulation_steps = self.config.batch_size // micro_global
        self.per_device = per_device
        self._num_processes = accelerator.num_processes
        return accelerator

    def _length_grouping(self) -> tuple[list[int] | None, int | None]:
        """``(lengths, micro-batch size)`` for a length-grouped sampler, or ``(None, None)``."""
        if not self.config.group_by_length:
            return None, None
        column = getattr(self.train_dataset, "column_names", None)
        if not column or "input_ids" not in column:
            raise ValueError("trainer.group_by_length=true needs a tokenised dataset with an input_ids column")
        lengths = [len(ids) for ids in self.train_dataset["input_ids"]]
        # Group at the micro-batch of all processes: accelerate deals consecutive
        # micro-batches of this size out to the processes.
        return lengths, self.per_device * self._num_processes

    def fit(self) -> dict:
        cfg, run_dir = self.config, Path(self.run_dir)
        accelerator = self._accelerator()
        is_main = accelerator.is_main_process
        if self.batching is not None:
            batches = self.batching(self.per_device)
        else:
            batches = EpochBatches(EpochShuffle(len(self.train_dataset), self.seed, *self._length_grouping()), self.per_device)
        loader = DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=self.collate_fn, num_workers=cfg.num_workers)
        optimizer = torch.optim.AdamW(optimizer_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        model, optimizer, loader = accelerator.prepare(self.model, optimizer, loader)
        if cfg.compile:
            model.compile()  # in place: parameter names, checkpoints and saved adapters stay as they are
        unwrapped = accelerator.unwrap_model(model)

        accum = accelerator.gradient_accumulation_steps
        steps_per_epoch = self._steps_per_epoch = math.ceil(len(loader) / accum)
        total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
        from transformers import get_linear_schedule_with_warmup

        # Not passed to accelerator.prepare: it would step once per process.
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

        cpu_start = time.process_time()
        summary = describe(unwrapped)
        state = {"global_step": 0, "epoch": 0, "best_metric": None, "best_step": None, "best_epoch": None, "history": [], "train_time_s": 0.0, "train_samples": 0}
        if self.resume:
            # Every process reads the files before the main one moves a damaged one aside.
            plan = inspect_resume(run_dir)
            accelerator.wait_for_everyone()
            restored = apply_resume(plan, unwrapped, optimizer, scheduler, is_main=is_main)
            if restored is not None:
                state = restored
                accelerator.print(f"resuming {run_dir} from step {state['global_step']} (epoch {state['epoch']})")
        record = dict(
            self.record,
            status="running",
            method=get_config(unwrapped).method,
            trainable_params=summary.trainable_params,
            adapter_params=summary.adapter_params,
            total_params=summary.total_params,
            equivalent_rank=max((l.equivalent_rank for l in summary.layers), default=0),
            adapted_layers=len(summary.layers),
            train_size=len(self.train_dataset),
            global_batch_size=cfg.batch_size,
            per_device_batch_size=self.per_device,
            gradient_accumulation=accum,
            num_processes=accelerator.num_processes,
            mixed_precision=accelerator.mixed_precision,
            total_steps=total_steps,
            warmup_steps=warmup,
            versions=package_versions(),
            git_commit=git_commit(),
            device=device_info(),
        )
        accelerator.print(str(summary).splitlines()[-1])

        def write_record(**extra) -> None:
            if is_main:
                record.update(extra)
                atomic_write_json(run_dir / RECORD_FILE, record)

        write_record(**self._state_fields(state))
        eval_every = cfg.eval_every or steps_per_epoch
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["global_step"], disable=not (is_main and cfg.progress), desc=str(record.get("name", "train")), dynamic_ncols=True)
        start = time.perf_counter()
        running_loss, running_n = 0.0, 0
        period_loss, period_n = 0.0, 0  # since the last evaluation
        try:
            while state["global_step"] < total_steps:
                epoch = state["global_step"] // steps_per_epoch
                batches.use_epoch(epoch)
                done_in_epoch = state["global_step"] - epoch * steps_per_epoch
                epoch_loader = accelerator.skip_first_batches(loader, done_in_epoch * accum) if done_in_epoch else loader
                model.train()
                for batch in epoch_loader:
                    step = state["global_step"]
                    with accelerator.accumulate(model):
                        self.method.on_step_begin(unwrapped, step)
                        loss = model(**batch).loss
                        if not torch.isfinite(loss.detach()):
                            raise TrainingDiverged(
                                f"loss is {loss.item()} at step {step} (epoch {epoch}); the run is stopped: "
                                "lower the learning rate, enable gradient clipping, or check the data"
                            )
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            if cfg.max_grad_norm:
                                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                            self.method.before_optimizer_step(unwrapped, step)
                        optimizer.step()
                        if accelerator.sync_gradients:
                            self.method.on_step_end(unwrapped, step)
                            scheduler.step()
                        optimizer.zero_grad()
                    # Mean over processes, so the logged loss does not depend on how the batch is split.
                    step_loss = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
                    running_loss += step_loss
                    running_n += 1
                    period_loss += step_loss
                    period_n += 1
                    state["train_samples"] += batch["labels"].shape[0] * accelerator.num_processes
                    if not accelerator.sync_gradients:
                        continue
                    state["global_step"] += 1
                    bar.update(1)
                    if state["global_step"] % cfg.log_every == 0 or state["global_step"] == total_steps:
                        mean_loss = running_loss / max(running_n, 1)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                        if is_main:
                            self.logger.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0], "epoch": epoch}, state["global_step"])
                        state["last_train_loss"] = mean_loss
                        running_loss, running_n = 0.0, 0
                    end_of_epoch = state["global_step"] % steps_per_epoch == 0
                    if state["global_step"] % eval_every == 0 or end_of_epoch or state["global_step"] == total_steps:
                        state["train_time_s"] += time.perf_counter() - start
                        state["period_train_loss"] = period_loss / max(period_n, 1)
                        period_loss, period_n = 0.0, 0
                        self._evaluate_and_checkpoint(model, unwrapped, accelerator, optimizer, scheduler, state, epoch, bar)
                        write_record(**self._state_fields(state))
                        start = time.perf_counter()
                        model.train()
                    if state["global_step"] >= total_steps:
                        break
        except TrainingDiverged as err:
            # Final, not retried: the same run diverges again (a learning-rate grid reads it as collapsed).
            write_record(status="failed", diverged=True, error=str(err), **self._state_fields(state))
            bar.close()
            self.logger.finish()
            raise
        bar.close()
        wall = time.time() - record["started_at"] if "started_at" in record else None
        # CPU seconds of all threads in this session (a resumed run counts its last session only):
        # comparable across runs on a shared, busy machine, unlike wall time.
        write_record(status="completed", **self._state_fields(state), peak_memory_mb=peak_memory_mb(), wall_time_s=wall,
                     process_cpu_time_s=time.process_time() - cpu_start,
                     throughput_samples_per_s=state["train_samples"] / max(state["train_time_s"], 1e-9))
        self.logger.finish()
        accelerator.wait_for_everyone()
        return record

    @staticmethod
    def _state_fields(state: dict) -> dict:
        keys = ("global_step", "best_metric", "best_step", "best_epoch", "best_metrics", "history", "train_time_s", "train_samples", "last_train_loss")
        return {k: state.get(k) for k in keys}

    def _evaluate_and_checkpoint(self, model, unwrapped, accelerator, optimizer, scheduler, state, epoch, bar) -> None:
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = self.evaluate(model, accelerator)
        entry = {"step": state["global_step"], "epoch": epoch + 1, "train_loss": state.get("period_train_loss"), "eval_time_s": time.perf_counter() - t0, **metrics}
        state["history"].append(entry)
        value = metrics[self.main_metric]
        best = state["best_metric"]
        # An undefined metric (a correlation of constant predictions) is worse than any number.
        improved = best is None or (math.isnan(best) and not math.isnan(value)) or (value > best if self.config.greater_is_better else value < best)
        bar.set_postfix(**{self.main_metric: f"{value:.4f}", "best": f"{(value if improved else best):.4f}"})
        if accelerator.is_main_process:
            self.logger.log({f"eval/{k}": v for k, v in metrics.items()}, state["global_step"])
            if self.write_predictions is not None:
                self.write_predictions(Path(self.run_dir), state["global_step"], epoch + 1)
            if improved:
                save_adapter(unwrapped, Path(self.run_dir) / "adapter")
        if improved:
            # Every metric at the selected evaluation: with held-out selection the
            # dev metric here is the one tables report.
            state.update(best_metric=value, best_step=state["global_step"], best_epoch=epoch + 1, best_metrics=dict(metrics))
        state["epoch"] = round(state["global_step"] / self._steps_per_epoch, 4)
        if accelerator.is_main_process:
            save_checkpoint(Path(self.run_dir), unwrapped, optimizer, scheduler, state)
        accelerator.wait_for_everyone()
