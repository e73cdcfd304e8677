"""Instruction tuning on Alpaca (paper Table 3): ``python -m melora.instruct [overrides]``.

``train_instruct(cfg)`` does the work and returns the run record; ``main`` is
the Hydra entry point (root config ``configs/instruct.yaml``). The protocol
follows the official ``llama_finetune.py``: the Stanford Alpaca prompt
template, a random dev hold-out, cutoff length, AdamW with linear warm-up and
decay, evaluation and a checkpoint every ``task.eval_every`` steps, and the
adapter with the lowest dev loss kept. The loss covers the response tokens only
(``task.train_on_inputs=false``), and micro-batches are grouped by length
(``task.group_by_length``). Each run writes to its folder::

    .hydra/config.yaml     resolved config (Hydra)
    config.yaml            the same, next to the record
    record.json            dev loss per evaluation, best loss/step, params, timing, versions
    adapter/               adapter with the lowest dev loss (evaluate it with melora.instructeval)
    checkpoint/            last checkpoint, for resume

Length grouping with the shared :class:`~melora.train.trainer.Trainer`: the
trainer shuffles dataset *items* with its own sampler, so the examples are
grouped into micro-batches beforehand (:class:`MicroBatches`, one item = one
micro-batch of similar-length examples) and the trainer counts batches in
micro-batches. The grouping is drawn once per run (the order of the
micro-batches still changes every epoch); the record's batch sizes are
reported in examples.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from melora.adapters.base import get_method
from melora.adapters.inject import inject
from melora.experiment import adapter_config, check_run_dir, cli_errors, resolved, trainer_config
from melora.train.loggers import make_logger
from melora.train.records import RECORD_FILE, atomic_write_json, atomic_write_text, config_hash
from melora.train.runlock import exclusive_run
from melora.train.trainer import Trainer, TrainerConfig, total_optimizer_steps

log = logging.getLogger(__name__)

# Examples sorted together when grouping by length (as transformers' LengthGroupedSampler).
MEGABATCH_FACTOR = 50
IGNORE_INDEX = -100


class MicroBatches(Dataset):
    """Tokenised examples grouped into fixed micro-batches; item ``i`` is micro-batch ``i``.

    With ``group_by_length`` the examples are shuffled (``seed``), cut into
    mega-batches of ``MEGABATCH_FACTOR × micro_batch_size`` examples, each
    sorted by decreasing length and cut into micro-batches, so a micro-batch
    holds examples of similar length and pads little; otherwise consecutive
    examples of the shuffled order form a micro-batch. The last micro-batch
    may be smaller.

    Args:
        dataset: Tokenised data (``input_ids``, ``attention_mask``, ``labels``), ``N`` rows.
        micro_batch_size: Examples per micro-batch ``b``.
        group_by_length: Group by length (see above).
        seed: Shuffling seed.
        shuffle: ``False``: keep the dataset order (then sort it by length
            when grouping); for evaluation sets.

    Shapes:
        ``len(self) = ceil(N / b)``; ``self[i]`` is a list of ``≤ b`` feature dicts.
    """

    def __init__(self, dataset: Any, micro_batch_size: int, group_by_length: bool = True, seed: int = 0, shuffle: bool = True) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.lengths = [len(ids) for ids in dataset["input_ids"]]
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(len(dataset)))
        if group_by_length:
            size = MEGABATCH_FACTOR * micro_batch_size if shuffle else len(order)
            order = [i for start in range(0, len(order), size) for i in sorted(order[start : start + size], key=lambda j: -self.lengths[j])]
        self.batches = [order[s : s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.dataset[i] for i in self.batches[index]]

    def padding_fraction(self) -> float:
        """Share of the padded ``(b, max length)`` token grid that is padding."""
        real = sum(self.lengths)
        padded = sum(len(b) * max(self.lengths[i] for i in b) for b in self.batches)
        return 1.0 - real / max(padded, 1)


def flatten_collator(collate: Callable[[Sequence[dict]], dict]) -> Callable[[Sequence[list[dict]]], dict]:
    """A collate function over :class:`MicroBatches` items: concatenates the items, then ``collate``."""

    def collate_items(items: Sequence[list[dict]]) -> dict:
        return collate([feature for item in items for feature in item])

    return collate_items


def prepare_alpaca_data(cfg: DictConfig, tokenizer) -> tuple[Any, Any]:
    """Load Alpaca, hold out the dev set, subsample and tokenise.

    The dev hold-out uses ``task.split_seed`` (the official 42); the training
    subset is the first ``task.max_train_samples`` of the shuffled training
    part and the dev subset the first ``task.max_dev_samples`` of the shuffled
    dev part, so they depend on the data, not on the run's seed.

    Returns:
        ``(train, dev)``: tokenised ``datasets.Dataset`` with ``input_ids``,
        ``attention_mask`` and ``labels`` (``-100`` on the prompt unless
        ``task.train_on_inputs``), unpadded, at most ``task.cutoff_len`` tokens.
    """
    from melora.data.alpaca import load_alpaca, tokenize_alpaca, train_dev_split

    task = cfg.task
    split = train_dev_split(load_alpaca(task.dataset, data_dir=cfg.data_dir), dev_size=task.dev_size, seed=task.split_seed)
    parts = {}
    for name, ds, cap in (("train", split["train"], task.max_train_samples), ("validation", split["validation"], task.max_dev_samples)):
        # train_test_split already shuffled each part: a prefix is a random subset.
        parts[name] = ds.select(range(min(cap, len(ds)))) if cap is not None else ds
    tokenized = {
        name: tokenize_alpaca(ds, tokenizer, cutoff_len=task.cutoff_len, train_on_inputs=task.train_on_inputs, add_eos=task.add_eos, cache_dir=cfg.cache_dir)
        for name, ds in parts.items()
    }
    return tokenized["train"], tokenized["validation"]


@torch.no_grad()
def token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and number of scored tokens of a batch.

    Args:
        model: A causal LM; ``model(input_ids, attention_mask).logits`` is
            ``(B, T, V)``.
        batch: ``input_ids``, ``attention_mask``, ``labels``, each ``(B, T)``;
            label ``-100`` is not scored.

    Returns:
        ``(loss_sum, n_tokens)``, float64 scalars; the logits at ``t`` are
        scored against the label at ``t + 1``, as the model's own loss.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss.double(), (labels != IGNORE_INDEX).sum().double()


def make_dev_loss_evaluator(dev: MicroBatches, collate_fn: Callable) -> Callable:
    """``evaluate(model, accelerator) -> {"dev_loss", "dev_ppl", "dev_tokens"}``.

    ``dev_loss`` is the mean cross-entropy per scored token over the whole dev
    set (token-weighted, gathered across processes), ``dev_ppl`` its exponential.
    """
    from torch.utils.data import DataLoader

    state: dict[str, Any] = {}

    def evaluate(model, accelerator) -> dict[str, float]:
        if "loader" not in state:
            state["loader"] = accelerator.prepare(DataLoader(dev, batch_size=1, collate_fn=collate_fn))
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for batch in state["loader"]:
            loss_sum, n_tokens = token_losses(model, batch)
            # One row per micro-batch, so gather_for_metrics drops the rows padded in for even sharding.
            rows = accelerator.gather_for_metrics(torch.stack([loss_sum, n_tokens]).reshape(1, 2))
            total += rows.sum(0)
        loss = (total[0] / total[1].clamp(min=1)).item()
        return {"dev_loss": loss, "dev_ppl": math.exp(min(loss, 50.0)), "dev_tokens": int(total[1].item())}

    return evaluate


@torch.no_grad()
def dev_loss_of(model, dev: MicroBatches, collate_fn: Callable, device: torch.device | str) -> float:
    """Token-weighted dev loss of ``model`` in this process alone (no accelerate), e.g. before training."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for index in range(len(dev)):
        batch = {k: v.to(device) for k, v in collate_fn([dev[index]]).items()}
        total += torch.stack(token_losses(model, batch)).cpu()
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def load_instruct_model(cfg: DictConfig):
    """The base causal LM of ``cfg.model``, ready for adapter training.

    The KV cache is switched off (training only); ``model.gradient_checkpointing``
    turns on activation recomputation, with input embeddings requiring grad so
    the checkpointed blocks see a graph even though the base is frozen.
    """
    from melora.models import load_causal_lm

    model = load_causal_lm(cfg.model)
    model.config.use_cache = False
    if cfg.model.get("gradient_checkpointing", False):
        # transformers 5 renamed it (the old name warns); pyproject allows >= 4.45.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()
    return model


def upcast_trainable(model: torch.nn.Module) -> int:
    """Keep the trainable (adapter) parameters in float32 when the base is bf16/fp16.

    AdamW updates are far below bf16's resolution of the weights they change;
    the adapter layers cast their input to the adapter dtype and the result
    back, so the forward pass works with or without autocast.

    Returns:
        Number of parameter tensors cast.
    """
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            cast += 1
    return cast


def micro_batch_trainer_config(tcfg: TrainerConfig, micro_batch_size: int) -> TrainerConfig:
    """``tcfg`` in units of :class:`MicroBatches` items (one item per process per forward).

    Raises:
        ValueError: the global batch is not a multiple of the micro-batch.
    """
    if tcfg.batch_size % micro_batch_size:
        raise ValueError(
            f"task.batch_size={tcfg.batch_size} is not a multiple of the micro-batch {micro_batch_size} "
            "(trainer.per_device_batch_size / task.micro_batch_size)"
        )
    from dataclasses import replace

    return replace(tcfg, batch_size=tcfg.batch_size // micro_batch_size, per_device_batch_size=1)


@exclusive_run  # one process per run folder: another one skips it
def train_instruct(cfg: DictConfig) -> dict:
    """Fine-tune ``cfg.model`` with ``cfg.method`` on ``cfg.task`` (Alpaca); returns the record."""
    from melora.data.alpaca import CausalLMCollator
    from melora.models import load_tokenizer

    run_dir = Path(cfg.run_dir)
    config = resolved(cfg)
    existing = check_run_dir(run_dir, config)
    if existing is not None and existing.get("status") == "completed":
        log.info("%s is already complete (best %s = %s); skipping", run_dir, cfg.task.metric, existing.get("best_metric"))
        return existing
    if existing is not None and not cfg.resume:
        raise ValueError(f"{run_dir} holds an unfinished run and resume=false; remove it or set resume=true")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    set_seed(cfg.seed)
    started = time.time()
    cpu_start = time.process_time()
    tokenizer = load_tokenizer(cfg.model)
    train_set, dev_set = prepare_alpaca_data(cfg, tokenizer)
    tcfg = trainer_config(cfg)
    micro = tcfg.per_device_batch_size or tcfg.batch_size
    # Which examples share a micro-batch depends on the run's seed, as with transformers' sampler.
    train_batches = MicroBatches(train_set, micro, cfg.task.group_by_length, seed=cfg.seed)
    dev_batches = MicroBatches(dev_set, cfg.task.eval_batch_size, group_by_length=True, shuffle=False)
    item_cfg = micro_batch_trainer_config(tcfg, micro)
    total_steps = total_optimizer_steps(len(train_batches), item_cfg)
    acfg = adapter_config(cfg.method, total_steps)

    set_seed(cfg.seed)  # the A init depends on the seed only, not on data loading
    model = load_instruct_model(cfg)
    model = inject(model, acfg, seed=cfg.seed)
    upcast_trainable(model)
    collate = flatten_collator(CausalLMCollator.from_tokenizer(tokenizer))
    # The base model's dev loss (B = 0, so ΔW = 0): the reference the training must beat.
    if existing is not None and existing.get("dev_loss_at_start") is not None:
        start_loss = existing["dev_loss_at_start"]
    else:
        from accelerate import PartialState

        device = PartialState().device
        start_loss = dev_loss_of(model.to(device), dev_batches, collate, device)
    name = f"{cfg.task.name}/{cfg.model.name}/{cfg.method.tag}/seed{cfg.seed}"
    record = {
        "name": name,
        "kind": "instruct",
        "profile": cfg.profile.name,
        "task": cfg.task.name,
        "metric": cfg.task.metric,
        "greater_is_better": False,
        "model": cfg.model.name,
        "model_name_or_path": cfg.model.name_or_path,
        "model_dtype": cfg.model.dtype,
        "gradient_checkpointing": bool(cfg.model.get("gradient_checkpointing", False)),
        "method_tag": cfg.method.tag,
        "method_config": acfg.to_dict(),
        "seed": cfg.seed,
        "dataset": cfg.task.dataset,
        "dev_size": len(dev_set),
        "eval_sizes": {"validation": len(dev_set)},
        "dev_loss_at_start": start_loss,
        "cutoff_len": cfg.task.cutoff_len,
        "train_on_inputs": cfg.task.train_on_inputs,
        "group_by_length": cfg.task.group_by_length,
        "micro_batches_per_epoch": len(train_batches),
        "padding_fraction": train_batches.padding_fraction(),
        "train_tokens": sum(train_batches.lengths),
        "config": config,
        "config_hash": config_hash(config),
        "started_at": started,
    }
    trainer = Trainer(
        model=model,
        method=get_method(acfg, seed=cfg.seed),
        train_dataset=train_batches,
        collate_fn=collate,
        evaluate=make_dev_loss_evaluator(dev_batches, collate),
        main_metric=cfg.task.metric,
        config=item_cfg,
        run_dir=run_dir,
        record=record,
        seed=cfg.seed,
        resume=cfg.resume,
        logger=make_logger(OmegaConf.to_container(cfg.logger, resolve=True), run_dir, config, name),
    )
    record = trainer.fit()
    # The trainer counts micro-batches; the record states batch sizes in examples.
    processes = record.get("num_processes", 1)
    record.update(global_batch_size=tcfg.batch_size, per_device_batch_size=micro, gradient_accumulation=tcfg.batch_size // (micro * processes), train_size=len(train_set))
    # CPU seconds of all threads in this session (a resumed run counts its last session only):
    # comparable across runs on a shared, busy machine, unlike wall time.
    record["process_cpu_time_s"] = time.process_time() - cpu_start
    from accelerate import PartialState

    if PartialState().is_main_process:
        atomic_write_json(run_dir / RECORD_FILE, record)
    return record


@hydra.main(version_base="1.3", config_path="../configs", config_name="instruct")
@cli_errors  # a configuration error: one line, no traceback (HYDRA_FULL_ERROR=1: the traceback)
def main(cfg: DictConfig) -> float | None:
    record = train_instruct(cfg)
    return record.get("best_metric")


if __name__ == "__main__":
    main()
