"""Instruction tuning on Alpaca (paper Table 3): ``python -m melora.experiments.instruct [overrides]``.

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
    adapter/               adapter with the lowest dev loss (evaluate it with melora.experiments.instructeval)
    checkpoint/            last checkpoint, for resume

Length grouping: the micro-batches are drawn once per run
(``melora.experiments.train.batching.length_grouped_batches``, windows of
``MEGABATCH_FACTOR`` micro-batches sorted by length) and the trainer visits
them in a new order every epoch (``FixedBatches``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from melora.experiments.data.alpaca import IGNORE_INDEX
from melora.experiments.scaffold import RunData, RunTask, entry_point
from melora.experiments.train.batching import FixedBatches, length_grouped_batches, padding_fraction
from melora.experiments.train.trainer import TrainerConfig

log = logging.getLogger(__name__)

# Examples sorted together when grouping by length (as transformers' LengthGroupedSampler).
MEGABATCH_FACTOR = 50


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
    from melora.experiments.data.alpaca import load_alpaca, tokenize_alpaca, train_dev_split

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


def dev_batches(dev, batch_size: int) -> list[list[int]]:
    """The dev set's micro-batches: the examples sorted by length once (the loss does not depend on the order)."""
    return length_grouped_batches([len(ids) for ids in dev["input_ids"]], batch_size, window=len(dev), seed=None)


class BatchItems(torch.utils.data.Dataset):
    """Item ``i``: the features of micro-batch ``i``.

    Loaded with ``batch_size=1``, so that accelerate shards whole micro-batches
    and knows how many there are: ``gather_for_metrics`` then drops exactly the
    micro-batches it repeated to even out the processes (with a ``batch_sampler``
    over the examples it cannot, and would count them twice).
    """

    def __init__(self, dataset, batches: list[list[int]]) -> None:
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.dataset[i] for i in self.batches[index]]


def make_dev_loss_evaluator(dev, batches: list[list[int]], collate_fn: Callable) -> Callable:
    """``evaluate(model, accelerator) -> {"dev_loss", "dev_ppl", "dev_tokens"}``.

    ``dev_loss`` is the mean cross-entropy per scored token over the whole dev
    set (token-weighted, gathered across processes), ``dev_ppl`` its exponential.
    """
    from torch.utils.data import DataLoader

    state: dict[str, Any] = {}

    def evaluate(model, accelerator) -> dict[str, float]:
        if "loader" not in state:
            items = BatchItems(dev, batches)
            state["loader"] = accelerator.prepare(DataLoader(items, batch_size=1, collate_fn=lambda one: collate_fn(one[0])))
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
def dev_loss_of(model, dev, batches: list[list[int]], collate_fn: Callable, device: torch.device | str) -> float:
    """Token-weighted dev loss of ``model`` in this process alone (no accelerate), e.g. before training."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for batch_indices in batches:
        batch = {k: v.to(device) for k, v in collate_fn([dev[i] for i in batch_indices]).items()}
        total += torch.stack(token_losses(model, batch)).cpu()
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def load_instruct_model(cfg: DictConfig):
    """The base causal LM of ``cfg.model``, ready for adapter training.

    The KV cache is switched off (training only); ``model.gradient_checkpointing``
    turns on activation recomputation, with input embeddings requiring grad so
    the checkpointed blocks see a graph even though the base is frozen.
    """
    from melora.experiments.models import load_causal_lm

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


def alpaca_data(cfg: DictConfig, tokenizer, tcfg: TrainerConfig) -> RunData:
    """Alpaca's training and dev sets, the micro-batches, and the dev-loss evaluator."""
    from melora.experiments.data.alpaca import CausalLMCollator

    train_set, dev_set = prepare_alpaca_data(cfg, tokenizer)
    lengths = [len(ids) for ids in train_set["input_ids"]]
    micro = tcfg.per_device_batch_size or tcfg.batch_size
    # Which examples share a micro-batch depends on the run's seed, as with transformers' sampler.
    batches = length_grouped_batches(lengths, micro, MEGABATCH_FACTOR * micro, seed=cfg.seed, group_by_length=cfg.task.group_by_length)
    dev = dev_batches(dev_set, cfg.task.eval_batch_size)
    collate = CausalLMCollator.from_tokenizer(tokenizer)
    return RunData(
        train=train_set,
        collate=collate,
        evaluate=make_dev_loss_evaluator(dev_set, dev, collate),
        main_metric=cfg.task.metric,
        record={
            "dataset": cfg.task.dataset,
            "dev_size": len(dev_set),
            "eval_sizes": {"validation": len(dev_set)},
            "cutoff_len": cfg.task.cutoff_len,
            "train_on_inputs": cfg.task.train_on_inputs,
            "group_by_length": cfg.task.group_by_length,
            "micro_batches_per_epoch": len(batches),
            "padding_fraction": padding_fraction(batches, lengths),
            "train_tokens": sum(lengths),
        },
        batching=lambda per_device: FixedBatches(batches, seed=cfg.seed),
        eval_data=(dev_set, dev),
    )


def prepare_instruct_model(model, data: RunData, existing: dict | None) -> dict:
    """Adapters in fp32 over a bf16/fp16 base, and the dev loss before training (the reference to beat)."""
    upcast_trainable(model)
    if existing is not None and existing.get("dev_loss_at_start") is not None:
        return {"dev_loss_at_start": existing["dev_loss_at_start"]}
    from accelerate import PartialState

    device = PartialState().device
    dev_set, batches = data.eval_data
    # B = 0, so ΔW = 0: this is the base model's dev loss.
    return {"dev_loss_at_start": dev_loss_of(model.to(device), dev_set, batches, data.collate, device)}


def instruct_record(cfg: DictConfig) -> dict:
    return {
        "greater_is_better": False,
        "model_dtype": cfg.model.dtype,
        "gradient_checkpointing": bool(cfg.model.get("gradient_checkpointing", False)),
    }


INSTRUCT = RunTask(kind="instruct", data=alpaca_data, model=load_instruct_model, prepare=prepare_instruct_model, record=instruct_record)

train_instruct = INSTRUCT.train  # cfg -> run record; a run folder another process holds is skipped
main = entry_point("instruct", train_instruct)

if __name__ == "__main__":
    main()
