"""The GLUE task registry: file layout, columns, labels and metrics per task.

This module has no heavy dependencies so that :mod:`melora.metrics` and
configuration code can use it without importing ``datasets``.

Two views of every task are described here and kept interchangeable:

* the original ``glue_data`` TSV files (what ``download_glue_data.py`` writes),
  read by :func:`melora.data.glue.load_glue` with ``source="local"``;
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


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Attributes:
        name (str): Short lower-case name, also the hub config name (``"sst2"``).
        dir_name (str): Folder under ``<data_dir>/glue/`` (``"SST-2"``).
        text_columns (tuple[tuple[str, ColumnRef], ...]): Pairs of
            (normalised hub column name, TSV column name or index), in input order.
        label_column (ColumnRef): TSV column holding the gold label.
        has_header (bool): Whether the TSV files start with a header row.
        num_columns (int | None): Exact number of fields per row for header-less
            files; ``None`` means "as many as the header".
        label_names (tuple[str, ...] | None): Class names in hub id order;
            ``None`` for the regression task STS-B.
        raw_labels (Mapping[str, int]): TSV label string -> label id.
        metric_names (tuple[str, ...]): Keys returned by
            :func:`melora.metrics.glue_metrics` for this task.
        main_metric (str): Metric used for model selection.
        local_files (Mapping[str, str]): Normalised split name -> TSV file name.
        hub_splits (Mapping[str, str]): Normalised split name -> hub split name.
    """

    name: str
    dir_name: str
    text_columns: tuple[tuple[str, ColumnRef], ...]
    label_column: ColumnRef
    has_header: bool
    label_names: tuple[str, ...] | None
    raw_labels: Mapping[str, int]
    metric_names: tuple[str, ...]
    main_metric: str
    local_files: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({"train": "train.tsv", "validation": "dev.tsv"})
    )
    hub_splits: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({"train": "train", "validation": "validation"})
    )
    num_columns: int | None = None

    @property
    def is_regression(self) -> bool:
        """bool: True for STS-B, whose label is a float score in [0, 5]."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """int: Size of the classification head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        """dict[int, str]: Label id -> name (empty for regression)."""
        return dict(enumerate(self.label_names or ()))

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


# CoLA, SST-2, MRPC and QQP files write the label as "0"/"1", already the hub id.
_DIGITS: Mapping[str, int] = MappingProxyType({"0": 0, "1": 1})


def _by_name(names: tuple[str, ...]) -> Mapping[str, int]:
    """TSV files of these tasks write the label as its class name."""
    return MappingProxyType({n: i for i, n in enumerate(names)})


_ENTAIL2 = ("entailment", "not_entailment")
_MNLI = ("entailment", "neutral", "contradiction")

GLUE_TASKS: Mapping[str, GlueTask] = MappingProxyType(
    {
        "cola": GlueTask(
            name="cola",
            dir_name="CoLA",
            # source, label, original annotator mark, sentence
            text_columns=(("sentence", 3),),
            label_column=1,
            has_header=False,
            num_columns=4,
            label_names=("unacceptable", "acceptable"),
            raw_labels=_DIGITS,
            metric_names=("matthews_correlation",),
            main_metric="matthews_correlation",
        ),
        "sst2": GlueTask(
            name="sst2",
            dir_name="SST-2",
            text_columns=(("sentence", "sentence"),),
            label_column="label",
            has_header=True,
            label_names=("negative", "positive"),
            raw_labels=_DIGITS,
            metric_names=("accuracy",),
            main_metric="accuracy",
        ),
        "mrpc": GlueTask(
            name="mrpc",
            dir_name="MRPC",
            text_columns=(("sentence1", "#1 String"), ("sentence2", "#2 String")),
            label_column="Quality",
            has_header=True,
            label_names=("not_equivalent", "equivalent"),
            raw_labels=_DIGITS,
            metric_names=("accuracy", "f1"),
            main_metric="accuracy",
        ),
        "qqp": GlueTask(
            name="qqp",
            dir_name="QQP",
            text_columns=(("question1", "question1"), ("question2", "question2")),
            label_column="is_duplicate",
            has_header=True,
            label_names=("not_duplicate", "duplicate"),
            raw_labels=_DIGITS,
            metric_names=("accuracy", "f1"),
            main_metric="accuracy",
        ),
        "stsb": GlueTask(
            name="stsb",
            dir_name="STS-B",
            text_columns=(("sentence1", "sentence1"), ("sentence2", "sentence2")),
            label_column="score",
            has_header=True,
            label_names=None,
            raw_labels=MappingProxyType({}),
            metric_names=("pearson", "spearmanr"),
            main_metric="pearson",
        ),
        "mnli": GlueTask(
            name="mnli",
            dir_name="MNLI",
            text_columns=(("premise", "sentence1"), ("hypothesis", "sentence2")),
            label_column="gold_label",
            has_header=True,
            label_names=_MNLI,
            raw_labels=_by_name(_MNLI),
            metric_names=("accuracy",),
            main_metric="accuracy",
            local_files=MappingProxyType(
                {
                    "train": "train.tsv",
                    "validation": "dev_matched.tsv",
                    "validation_mismatched": "dev_mismatched.tsv",
                }
            ),
            hub_splits=MappingProxyType(
                {
                    "train": "train",
                    "validation": "validation_matched",
                    "validation_mismatched": "validation_mismatched",
                }
            ),
        ),
        "qnli": GlueTask(
            name="qnli",
            dir_name="QNLI",
            text_columns=(("question", "question"), ("sentence", "sentence")),
            label_column="label",
            has_header=True,
            label_names=_ENTAIL2,
            raw_labels=_by_name(_ENTAIL2),
            metric_names=("accuracy",),
            main_metric="accuracy",
        ),
        "rte": GlueTask(
            name="rte",
            dir_name="RTE",
            text_columns=(("sentence1", "sentence1"), ("sentence2", "sentence2")),
            label_column="label",
            has_header=True,
            label_names=_ENTAIL2,
            raw_labels=_by_name(_ENTAIL2),
            metric_names=("accuracy",),
            main_metric="accuracy",
        ),
    }
)

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
