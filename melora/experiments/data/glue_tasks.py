"""The GLUE task registry: file layout, columns, labels and metrics per task.

This module has no heavy dependencies so that :mod:`melora.experiments.metrics` and
configuration code can use it without importing ``datasets``.

Two views of every task are described here and kept interchangeable:

* the original ``glue_data`` TSV files (what ``download_glue_data.py`` writes),
  read by :func:`melora.experiments.data.glue.load_glue` with ``source="local"``;
* the Hugging Face hub dataset ``nyu-mll/glue``.

Label ids are those of the hub's ``ClassLabel`` features, so a model trained on
one source can be evaluated on the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

HUB_DATASET = "nyu-mll/glue"

# Column reference in a TSV file: a header name, or a 0-based index for CoLA,
# whose train/dev files have no header.
ColumnRef = str | int
# Split -> TSV file and split -> hub split of every task but MNLI.
_FILES: Mapping[str, str] = MappingProxyType({"train": "train.tsv", "validation": "dev.tsv"})
_SPLITS: Mapping[str, str] = MappingProxyType({"train": "train", "validation": "validation"})


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Attributes:
        name (str): Short lower-case name, also the hub config name (``"sst2"``).
        dir_name (str): Folder under ``<data_dir>/glue/`` (``"SST-2"``).
        text_columns (tuple[tuple[str, ColumnRef], ...]): Pairs of
            (normalised hub column name, TSV column name or index), in input order.
        label_column (ColumnRef): TSV column holding the gold label.
        label_names (tuple[str, ...] | None): Class names in hub id order;
            ``None`` for the regression task STS-B.
        metric_names (tuple[str, ...]): Keys returned by
            :func:`melora.experiments.metrics.glue_metrics` for this task; the first one
            selects models (:attr:`main_metric`).
        raw_labels (Mapping[str, int] | None): TSV label string -> label id;
            ``None``: the TSV writes the class name (``label_names`` in order).
        has_header (bool): Whether the TSV files start with a header row.
        num_columns (int | None): Exact number of fields per row for header-less
            files; ``None`` means "as many as the header".
        local_files (Mapping[str, str]): Normalised split name -> TSV file name.
        hub_splits (Mapping[str, str]): Normalised split name -> hub split name.
    """

    name: str
    dir_name: str
    text_columns: tuple[tuple[str, ColumnRef], ...]
    label_column: ColumnRef
    label_names: tuple[str, ...] | None
    metric_names: tuple[str, ...]
    raw_labels: Mapping[str, int] | None = None
    has_header: bool = True
    num_columns: int | None = None
    local_files: Mapping[str, str] = field(default_factory=lambda: _FILES)
    hub_splits: Mapping[str, str] = field(default_factory=lambda: _SPLITS)

    def __post_init__(self) -> None:
        if self.raw_labels is None:
            by_name = MappingProxyType({n: i for i, n in enumerate(self.label_names or ())})
            object.__setattr__(self, "raw_labels", by_name)

    @property
    def main_metric(self) -> str:
        """str: The metric that selects models (the one the task's YAML names as ``metric``)."""
        return self.metric_names[0]

    @property
    def is_regression(self) -> bool:
        """bool: True for STS-B, whose label is a float score in [0, 5]."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """int: Size of the classification head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def label2id(self) -> dict[str, int]:
        """dict[str, int]: Label name -> id (empty for regression)."""
        return {name: i for i, name in enumerate(self.label_names or ())}

    @property
    def text_fields(self) -> tuple[str, ...]:
        """tuple[str, ...]: Normalised text column names, in input order."""
        return tuple(name for name, _ in self.text_columns)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """tuple[str, ...]: Normalised evaluation splits (``validation`` first)."""
        return tuple(split for split in self.local_files if split != "train")


# CoLA, SST-2, MRPC and QQP files write the label as "0"/"1", already the hub id;
# RTE, QNLI and MNLI write the class name; STS-B a float score.
_DIGITS: Mapping[str, int] = MappingProxyType({"0": 0, "1": 1})
_ENTAIL2 = ("entailment", "not_entailment")
_MNLI = ("entailment", "neutral", "contradiction")
_MNLI_FILES = MappingProxyType({"train": "train.tsv", "validation": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"})
_MNLI_SPLITS = MappingProxyType({"train": "train", "validation": "validation_matched", "validation_mismatched": "validation_mismatched"})


def _pair(a: str, b: str, a_tsv: str | None = None, b_tsv: str | None = None) -> tuple[tuple[str, ColumnRef], ...]:
    """Two text columns, each (hub name, TSV header name; by default the same)."""
    return ((a, a_tsv or a), (b, b_tsv or b))


# fmt: off
_TASKS = (
    # CoLA's files have no header: source, label, original annotator mark, sentence.
    GlueTask("cola", "CoLA", (("sentence", 3),), 1, ("unacceptable", "acceptable"), ("matthews_correlation",),
             raw_labels=_DIGITS, has_header=False, num_columns=4),
    GlueTask("sst2", "SST-2", (("sentence", "sentence"),), "label", ("negative", "positive"), ("accuracy",), raw_labels=_DIGITS),
    GlueTask("mrpc", "MRPC", _pair("sentence1", "sentence2", "#1 String", "#2 String"), "Quality",
             ("not_equivalent", "equivalent"), ("accuracy", "f1"), raw_labels=_DIGITS),
    GlueTask("qqp", "QQP", _pair("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"), ("accuracy", "f1"),
             raw_labels=_DIGITS),
    GlueTask("stsb", "STS-B", _pair("sentence1", "sentence2"), "score", None, ("pearson", "spearmanr")),
    GlueTask("mnli", "MNLI", _pair("premise", "hypothesis", "sentence1", "sentence2"), "gold_label", _MNLI, ("accuracy",),
             local_files=_MNLI_FILES, hub_splits=_MNLI_SPLITS),
    GlueTask("qnli", "QNLI", _pair("question", "sentence"), "label", _ENTAIL2, ("accuracy",)),
    GlueTask("rte", "RTE", _pair("sentence1", "sentence2"), "label", _ENTAIL2, ("accuracy",)),
)
# fmt: on
GLUE_TASKS: Mapping[str, GlueTask] = MappingProxyType({task.name: task for task in _TASKS})

# The offline data folder shipped with this project lacks these files; the
# error for a missing file says so and points at the hub.
NOT_IN_OFFLINE_FOLDER: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"mnli": ("train", "validation", "validation_mismatched"), "qqp": ("train", "validation"), "qnli": ("train",)}
)

_ALIASES = {
    "sst-2": "sst2",
    "sts-b": "stsb",
    "mnli_matched": "mnli",
    "mnli-m": "mnli",
    "mnli_mismatched": "mnli",
    "mnli-mm": "mnli",
}


def get_task(task: str | GlueTask) -> GlueTask:
    """Look up a GLUE task by name.

    Args:
        task (str | GlueTask): A registry name (``"sst2"``), a glue_data folder
            name (``"SST-2"``, case-insensitive) or an MNLI variant
            (``"mnli-mm"``, ``"mnli_mismatched"``, which map to ``"mnli"``).
            A :class:`GlueTask` is returned unchanged.

    Returns:
        GlueTask: The task description.

    Raises:
        KeyError: If the task is not one of the eight supported GLUE tasks.
    """
    if isinstance(task, GlueTask):
        return task
    key = task.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise KeyError(f"Unknown GLUE task {task!r}; expected one of {sorted(GLUE_TASKS)}.")
    return GLUE_TASKS[key]


def main_metric(task: str | GlueTask) -> str:
    """Return the metric used for model selection on ``task``.

    Args:
        task (str | GlueTask): Task name (see :func:`get_task`).

    Returns:
        str: ``"matthews_correlation"`` for CoLA, ``"pearson"`` for STS-B and
        ``"accuracy"`` for the others (MNLI: accuracy on the matched split).
    """
    return get_task(task).main_metric
