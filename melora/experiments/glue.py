"""GLUE fine-tuning (paper Table 2): ``python -m melora.experiments.glue [overrides]``.

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

from melora.experiments.scaffold import RunData, RunTask, entry_point

log = logging.getLogger(__name__)


HELDOUT = "heldout"  # the eval split carved out of the training data; its metrics are "heldout_<metric>"
DEV_HALVES = "dev_halves"  # the dev set split into a validation and a test half; metrics "val_<metric>", "test_<metric>"
HALVES = ("val", "test")


def selection_split(cfg: DictConfig) -> str:
    """``"dev_halves"``, ``"heldout"`` or ``"dev"``: where the best epoch is chosen (``selection=`` config group)."""
    split = OmegaConf.select(cfg, "selection.split", default="dev")
    if split not in ("dev", HELDOUT, DEV_HALVES):
        raise ValueError(f"selection.split={split!r} is not known; use selection=dev_halves, selection=heldout or selection=dev")
    return split


def selection_metric(cfg: DictConfig) -> str:
    """The key of the evaluator's metrics that picks the best epoch."""
    split = selection_split(cfg)
    prefix = {HELDOUT: f"{HELDOUT}_", DEV_HALVES: "val_"}.get(split, "")
    return prefix + cfg.task.metric


def prepare_glue_data(cfg: DictConfig, tokenizer):
    """Load, subsample and tokenise the task.

    Returns ``(train, {eval_split: dataset}, selection_info, halves)``. With
    ``selection=heldout`` the eval splits include ``"heldout"``, a fixed part of
    the training subset that is not trained on. With ``selection=dev_halves``
    ``halves`` is ``{"val": indices, "test": indices}`` into the dev set
    (``validation``), which is split once (:func:`melora.experiments.data.glue.dev_halves`);
    otherwise ``None``.
    """
    from melora.experiments.data.glue import dev_halves, heldout_split, load_glue, subsample, tokenize_glue
    from melora.experiments.data.glue_tasks import get_task

    dsdict = load_glue(cfg.task.name, data_dir=cfg.data_dir, source=cfg.task.source)
    # The subset depends on the data seed only, so every method/seed sees the same examples.
    dsdict["train"] = subsample(dsdict["train"], cfg.task.max_train_samples, seed=1234)
    for split in [s for s in dsdict if s != "train"]:
        dsdict[split] = subsample(dsdict[split], cfg.task.max_eval_samples, seed=1234)
    info, halves = {"split": "dev"}, None
    if selection_split(cfg) == HELDOUT:
        sel = cfg.selection
        dsdict["train"], dsdict[HELDOUT], info = heldout_split(dsdict["train"], sel.fraction, sel.min_examples, sel.seed)
    elif selection_split(cfg) == DEV_HALVES:
        sel = cfg.selection
        validation, test, info = dev_halves(dsdict["validation"]["label"], sel.seed, get_task(cfg.task.name).is_regression, sel.score_bins)
        halves = {"val": validation, "test": test}
    tokenized = tokenize_glue(dsdict, tokenizer, cfg.task.name, cfg.task.max_length, cache_dir=cfg.cache_dir)
    return tokenized["train"], {s: tokenized[s] for s in tokenized if s != "train"}, info, halves


class GlueEvaluator:
    """``evaluator(model, accelerator) -> metrics`` over the dev split(s), gathered across processes.

    Each eval split's metrics are keyed ``<metric>`` (``validation``),
    ``<split>_<metric>`` (``heldout``, ``mismatched``); with ``halves`` also
    ``val_<metric>`` and ``test_<metric>`` on those rows of ``validation``,
    from the same predictions. After a call, ``predictions()`` gives the
    per-example predictions of ``validation`` in dataset order: shape ``(N,)``,
    class ids (int8) or scores (float32, regression).
    """

    def __init__(self, task: str, eval_sets: dict, collate_fn, batch_size: int, halves: dict | None = None):
        from melora.experiments.data.glue_tasks import get_task

        self.task, self.eval_sets, self.collate_fn, self.batch_size = task, eval_sets, collate_fn, batch_size
        self.spec, self.halves = get_task(task), halves
        self._loaders, self._order, self._predictions = {}, {}, None

    def _loader(self, split: str, accelerator):
        from torch.utils.data import DataLoader

        if split not in self._loaders:
            # Longest first: batches of similar length pad less. Predictions are put
            # back in dataset order before any metric or file sees them.
            ds = self.eval_sets[split]
            lengths = [len(ids) for ids in ds["input_ids"]]
            self._order[split] = sorted(range(len(ds)), key=lengths.__getitem__, reverse=True)
            loader = DataLoader(ds.select(self._order[split]), batch_size=self.batch_size, collate_fn=self.collate_fn)
            self._loaders[split] = accelerator.prepare(loader)
        return self._loaders[split]

    def __call__(self, model, accelerator) -> dict[str, float]:
        from melora.experiments.metrics import glue_metrics

        metrics = {}
        for split in self.eval_sets:
            preds, refs = [], []
            for batch in self._loader(split, accelerator):
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                logits, labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
                preds.append(logits.squeeze(-1) if self.spec.is_regression else logits.argmax(-1))
                refs.append(labels)
            order = torch.as_tensor(self._order[split])
            pred, ref = torch.empty_like(torch.cat(preds)).cpu(), torch.empty_like(torch.cat(refs)).cpu()
            pred[order], ref[order] = torch.cat(preds).cpu(), torch.cat(refs).cpu()
            prefix = "" if split == "validation" else f"{split.removeprefix('validation_')}_"
            views = {prefix: None}
            if split == "validation":
                self._predictions = pred.to(torch.float32 if self.spec.is_regression else torch.int8)
                views.update({f"{half}_": rows for half, rows in (self.halves or {}).items()})
            for name, rows in views.items():
                p, r = (pred, ref) if rows is None else (pred[rows], ref[rows])
                metrics.update({name + k: float(v) for k, v in glue_metrics(self.task, p.numpy(), r.numpy()).items()})
        return metrics

    def predictions(self) -> dict[str, torch.Tensor]:
        """``{"validation": predictions}`` of the last call (empty before the first)."""
        return {} if self._predictions is None else {"validation": self._predictions}


def make_glue_evaluator(task: str, eval_sets: dict, collate_fn, batch_size: int, halves: dict | None = None) -> GlueEvaluator:
    """``evaluate(model, accelerator) -> metrics`` over the dev split(s) (see :class:`GlueEvaluator`)."""
    return GlueEvaluator(task, eval_sets, collate_fn, batch_size, halves)


def glue_data(cfg: DictConfig, tokenizer, tcfg) -> RunData:
    """The task's training subset, its eval splits and evaluator, and where the best epoch is chosen.

    With ``selection=dev_halves`` the per-example dev predictions of every
    evaluation are kept (``predictions.safetensors`` in the run folder).
    """
    from melora.experiments.data.glue import glue_collator

    train_set, eval_sets, selection, halves = prepare_glue_data(cfg, tokenizer)
    collate = glue_collator(tokenizer)
    evaluator = make_glue_evaluator(cfg.task.name, eval_sets, collate, batch_size=max(64, tcfg.batch_size), halves=halves)
    sizes = {s: len(d) for s, d in eval_sets.items()} | {h: len(rows) for h, rows in (halves or {}).items()}
    keep_predictions = None
    if halves is not None:
        from melora.experiments.train.predictions import write_predictions

        labels = torch.as_tensor(eval_sets["validation"]["labels"])
        labels = labels.to(torch.float32 if labels.is_floating_point() else torch.int8)

        def keep_predictions(run_dir, step: int, epoch: int) -> None:
            write_predictions(run_dir, step, epoch, evaluator.predictions()["validation"], cfg.task.name, labels)

    return RunData(
        train=train_set,
        collate=collate,
        evaluate=evaluator,
        main_metric=selection_metric(cfg),
        record={"eval_sizes": sizes, "selection": selection, "selection_metric": selection_metric(cfg)},
        write_predictions=keep_predictions,
    )


def glue_model(cfg: DictConfig):
    """The pretrained encoder with a fresh head for the task (classification or regression)."""
    from melora.experiments.data.glue_tasks import get_task
    from melora.experiments.models import load_sequence_classifier

    spec = get_task(cfg.task.name)
    return load_sequence_classifier(cfg.model, spec.num_labels, "regression" if spec.is_regression else "single_label_classification")


GLUE = RunTask(kind="glue", data=glue_data, model=glue_model)

train_glue = GLUE.train  # cfg -> run record; a run folder another process holds is skipped
main = entry_point("config", train_glue)

if __name__ == "__main__":
    main()
