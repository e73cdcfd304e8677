"""GLUE fine-tuning (paper Table 2): ``python -m melora.glue [overrides]``.

``train_glue(cfg)`` does the work and returns the run record; ``main`` is the
Hydra entry point. Each run writes to its folder::

    .hydra/config.yaml     resolved config (Hydra)
    config.yaml            the same, next to the record
    record.json            metrics per epoch, best metric/epoch, params, timing, versions
    adapter/               best-epoch adapter (safetensors + JSON)
    checkpoint/            last checkpoint, for resume
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf

from melora.experiment import RunData, RunTask, entry_point

log = logging.getLogger(__name__)


HELDOUT = "heldout"  # the eval split carved out of the training data; its metrics are "heldout_<metric>"


def selection_split(cfg: DictConfig) -> str:
    """``"heldout"`` or ``"dev"``: where the best epoch is chosen (``selection=`` config group)."""
    split = OmegaConf.select(cfg, "selection.split", default="dev")
    if split not in ("dev", HELDOUT):
        raise ValueError(f"selection.split={split!r} is not known; use selection=heldout or selection=dev")
    return split


def selection_metric(cfg: DictConfig) -> str:
    """The key of the evaluator's metrics that picks the best epoch."""
    return f"{HELDOUT}_{cfg.task.metric}" if selection_split(cfg) == HELDOUT else cfg.task.metric


def prepare_glue_data(cfg: DictConfig, tokenizer):
    """Load, subsample and tokenise the task.

    Returns ``(train, {eval_split: dataset}, selection_info)``. With
    ``selection=heldout`` the eval splits include ``"heldout"``, a fixed part of
    the training subset that is not trained on.
    """
    from melora.data.glue import heldout_split, load_glue, subsample, tokenize_glue

    dsdict = load_glue(cfg.task.name, data_dir=cfg.data_dir, source=cfg.task.source)
    # The subset depends on the data seed only, so every method/seed sees the same examples.
    dsdict["train"] = subsample(dsdict["train"], cfg.task.max_train_samples, seed=1234)
    for split in [s for s in dsdict if s != "train"]:
        dsdict[split] = subsample(dsdict[split], cfg.task.max_eval_samples, seed=1234)
    info = {"split": "dev"}
    if selection_split(cfg) == HELDOUT:
        sel = cfg.selection
        dsdict["train"], dsdict[HELDOUT], info = heldout_split(dsdict["train"], sel.fraction, sel.min_examples, sel.seed)
    tokenized = tokenize_glue(dsdict, tokenizer, cfg.task.name, cfg.task.max_length, cache_dir=cfg.cache_dir)
    return tokenized["train"], {s: tokenized[s] for s in tokenized if s != "train"}, info


def make_glue_evaluator(task: str, eval_sets: dict, collate_fn, batch_size: int):
    """``evaluate(model, accelerator) -> metrics`` over the dev split(s), gathered across processes."""
    from torch.utils.data import DataLoader

    from melora.data.glue_tasks import get_task
    from melora.metrics import glue_metrics

    spec = get_task(task)
    loaders = {}

    def evaluate(model, accelerator) -> dict[str, float]:
        metrics = {}
        for split, ds in eval_sets.items():
            if split not in loaders:
                # Longest first: batches of similar length pad less. The metrics
                # do not depend on the order (predictions and labels stay paired).
                lengths = [len(ids) for ids in ds["input_ids"]]
                by_length = sorted(range(len(ds)), key=lengths.__getitem__, reverse=True)
                loaders[split] = accelerator.prepare(DataLoader(ds.select(by_length), batch_size=batch_size, collate_fn=collate_fn))
            preds, refs = [], []
            for batch in loaders[split]:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                logits, labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
                preds.append(logits.squeeze(-1) if spec.is_regression else logits.argmax(-1))
                refs.append(labels)
            result = glue_metrics(task, torch.cat(preds).cpu().numpy(), torch.cat(refs).cpu().numpy())
            prefix = "" if split == "validation" else f"{split.removeprefix('validation_')}_"
            metrics.update({prefix + k: float(v) for k, v in result.items()})
        return metrics

    return evaluate


def glue_data(cfg: DictConfig, tokenizer, tcfg) -> RunData:
    """The task's training subset, its eval splits and evaluator, and where the best epoch is chosen."""
    from melora.data.glue import glue_collator

    train_set, eval_sets, selection = prepare_glue_data(cfg, tokenizer)
    collate = glue_collator(tokenizer)
    return RunData(
        train=train_set,
        collate=collate,
        evaluate=make_glue_evaluator(cfg.task.name, eval_sets, collate, batch_size=max(64, tcfg.batch_size)),
        main_metric=selection_metric(cfg),
        record={"eval_sizes": {s: len(d) for s, d in eval_sets.items()}, "selection": selection, "selection_metric": selection_metric(cfg)},
    )


def glue_model(cfg: DictConfig):
    """The pretrained encoder with a fresh head for the task (classification or regression)."""
    from melora.data.glue_tasks import get_task
    from melora.models import load_sequence_classifier

    spec = get_task(cfg.task.name)
    return load_sequence_classifier(cfg.model, spec.num_labels, "regression" if spec.is_regression else "single_label_classification")


GLUE = RunTask(kind="glue", data=glue_data, model=glue_model)

train_glue = GLUE.train  # cfg -> run record; a run folder another process holds is skipped
main = entry_point("config", train_glue)

if __name__ == "__main__":
    main()
