"""GLUE data: loading (local ``glue_data`` TSVs or the hub), subsampling, tokenisation.

Both sources give the same schema, that of the hub dataset ``nyu-mll/glue``:

======  =============================  ==========================================
task    text columns                   label
======  =============================  ==========================================
cola    sentence                       ClassLabel(unacceptable, acceptable)
sst2    sentence                       ClassLabel(negative, positive)
mrpc    sentence1, sentence2           ClassLabel(not_equivalent, equivalent)
qqp     question1, question2           ClassLabel(not_duplicate, duplicate)
stsb    sentence1, sentence2           float32 score in [0, 5]
mnli    premise, hypothesis            ClassLabel(entailment, neutral, contradiction)
qnli    question, sentence             ClassLabel(entailment, not_entailment)
rte     sentence1, sentence2           ClassLabel(entailment, not_entailment)
======  =============================  ==========================================

plus ``idx`` (int32). Splits are ``train`` and ``validation``; MNLI also has
``validation_mismatched`` (``validation`` is the matched one).

``idx`` of a local file is the 0-based data-row number in that file, which is
what the hub uses except for MRPC: the hub numbers MRPC rows of the raw
``msr_paraphrase_train.txt`` (train and dev interleaved), so MRPC ``idx``
values differ between the sources while rows and their order are the same.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from melora.experiments.data.cache import default_cache_dir, stable_hash, tokenizer_fingerprint
from melora.experiments.data.errors import DataFormatError
from melora.experiments.data.glue_tasks import GLUE_TASKS, HUB_DATASET, NOT_IN_OFFLINE_FOLDER, GlueTask, get_task, main_metric
from melora.experiments.data.paths import DATA_DIR_ENV, resolve_data_dir
from melora.files import file_sha256

__all__ = [
    "GLUE_TASKS",
    "GlueTask",
    "get_task",
    "main_metric",
    "glue_features",
    "load_glue",
    "subsample",
    "tokenize_glue",
    "glue_collator",
]

Source = Literal["auto", "local", "hub"]

# Part of every cache key: bump when parsing or tokenisation output changes.
_LOCAL_FORMAT_VERSION = 1
_TOKENIZE_VERSION = 1


def glue_features(task: str | GlueTask) -> Features:
    """Return the hub schema of ``task``: text columns, ``label``, ``idx``.

    Args:
        task (str | GlueTask): Task name (see :func:`get_task`).

    Returns:
        datasets.Features: The features, in the hub's column order.
    """
    spec = get_task(task)
    cols: dict[str, Any] = {name: Value("string") for name in spec.text_fields}
    cols["label"] = Value("float32") if spec.is_regression else ClassLabel(names=list(spec.label_names))
    cols["idx"] = Value("int32")
    return Features(cols)


def load_glue(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    source: Source = "auto",
) -> DatasetDict:
    """Load a GLUE task with the hub's schema (see the module docstring).

    Args:
        task (str): One of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte (or a
            glue_data folder name such as ``"SST-2"``).
        data_dir (str | os.PathLike | None): Folder holding
            ``glue/<TASK>/{train,dev}.tsv``. Defaults to ``$MELORA_DATA_DIR``.
        source (str): ``"auto"`` reads local files when a data folder is known
            (argument or environment) and the hub otherwise; ``"local"``
            requires a data folder; ``"hub"`` always uses ``nyu-mll/glue``.

    Returns:
        datasets.DatasetDict: ``train`` and ``validation`` (and
        ``validation_mismatched`` for MNLI).

    Raises:
        FileNotFoundError: A local file is missing (the message says whether
            the task needs the hub).
        DataFormatError: A local file has a malformed row; the message names
            the file and line.
        ValueError: Bad ``source``, or ``source="local"`` without a data folder.
    """
    spec = get_task(task)
    root = _local_root(source, data_dir)
    if root is None:
        return _load_hub(spec)
    folder = root / "glue" / spec.dir_name
    return DatasetDict({split: _load_local_split(spec, folder, split) for split in spec.local_files})


def _local_root(source: str, data_dir: str | os.PathLike[str] | None) -> Path | None:
    """Pick the data folder for ``source``; ``None`` means the hub."""
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}.")
    if source == "hub":
        return None
    root = resolve_data_dir(data_dir)
    if source == "local" and root is None:
        raise ValueError(f"source='local' needs data_dir=... or the {DATA_DIR_ENV} environment variable.")
    return root


# --------------------------------------------------------------------------- local


@dataclass(frozen=True)
class _Layout:
    """Resolved column positions of one TSV file."""

    n_fields: int
    text: tuple[tuple[str, int], ...]
    label: int


def _load_local_split(spec: GlueTask, folder: Path, split: str) -> Dataset:
    """Read one TSV split into a Dataset with a content-derived fingerprint."""
    path = folder / spec.local_files[split]
    if not path.is_file():
        raise FileNotFoundError(_missing_file_message(spec, path, split))
    columns = _parse_tsv(spec, path)
    table_ds = Dataset.from_dict(columns, features=glue_features(spec), split=split)
    # The fingerprint depends on the file bytes only, so tokenisation caches
    # keyed on it survive across processes.
    fingerprint = stable_hash("glue-local", _LOCAL_FORMAT_VERSION, spec.name, split, file_sha256(path))
    return Dataset(table_ds.data, info=table_ds.info, split=table_ds.split, fingerprint=fingerprint)


def _missing_file_message(spec: GlueTask, path: Path, split: str) -> str:
    """Explain a missing TSV file and what to do about it."""
    fname = spec.local_files[split]
    msg = (
        f"GLUE {spec.name} ({split}): file not found: {path}. Local loading expects the original "
        f"glue_data layout <data_dir>/glue/{spec.dir_name}/{fname}."
    )
    if split in NOT_IN_OFFLINE_FOLDER.get(spec.name, ()):
        return msg + (
            f" The offline data folder does not include {spec.dir_name}/{fname}: {spec.name} needs the "
            f"Hugging Face hub ({HUB_DATASET}). Unset {DATA_DIR_ENV} or pass source='hub' (needs network)."
        )
    return msg + f" Put the file there, or load from the hub: unset {DATA_DIR_ENV} or pass source='hub'."


def _parse_tsv(spec: GlueTask, path: Path) -> dict[str, list[Any]]:
    """Parse a glue_data TSV into column lists (text columns, label, idx)."""
    columns: dict[str, list[Any]] = {name: [] for name in spec.text_fields}
    labels: list[Any] = []
    # utf-8-sig: MRPC files start with a byte-order mark before "Quality".
    # QUOTE_NONE: GLUE text contains unbalanced '"' characters.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        layout = _read_layout(spec, reader, path)
        for row in reader:
            if not row:
                continue
            if len(row) != layout.n_fields:
                problem = f"expected {layout.n_fields} tab-separated fields, found {len(row)}"
                raise DataFormatError(_row_error(path, reader.line_num, problem))
            for name, i in layout.text:
                columns[name].append(row[i])
            labels.append(_parse_label(spec, row[layout.label], path, reader.line_num))
    columns["label"] = labels
    columns["idx"] = list(range(len(labels)))
    return columns


def _read_layout(spec: GlueTask, reader: Any, path: Path) -> _Layout:
    """Map the task's column references to indices, consuming the header if any."""
    if not spec.has_header:
        return _Layout(spec.num_columns or 0, tuple((n, int(c)) for n, c in spec.text_columns), int(spec.label_column))
    header = next(reader, None)
    if not header:
        raise DataFormatError(_row_error(path, 1, "the file is empty (expected a header row)"))
    wanted = [c for _, c in spec.text_columns] + [spec.label_column]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataFormatError(_row_error(path, 1, f"header lacks column(s) {missing}; found {header}"))
    pos = {name: i for i, name in enumerate(header)}
    return _Layout(len(header), tuple((n, pos[c]) for n, c in spec.text_columns), pos[spec.label_column])


def _parse_label(spec: GlueTask, raw: str, path: Path, line: int) -> int | float:
    """Convert a TSV label field to the hub's label id (or float score)."""
    value = raw.strip()
    if spec.is_regression:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            problem = f"label {raw!r} in column {spec.label_column!r} is not a number"
            raise DataFormatError(_row_error(path, line, problem))
        return score
    if value not in spec.raw_labels:
        raise DataFormatError(
            _row_error(
                path, line, f"label {raw!r} in column {spec.label_column!r} is not one of {sorted(spec.raw_labels)}"
            )
        )
    return spec.raw_labels[value]


def _row_error(path: Path, line: int, problem: str) -> str:
    """Format a malformed-row message with the fix."""
    return (
        f"{path}, line {line}: {problem}. Expected the original GLUE TSV format (tab-separated, no quoting); "
        f"re-create the file with download_glue_data.py, or load from the hub with source='hub'."
    )


# ----------------------------------------------------------------------------- hub


def _load_hub(spec: GlueTask) -> DatasetDict:
    """Load ``nyu-mll/glue`` and keep the normalised splits and columns."""
    # Called through the module attribute so tests can monkeypatch it.
    try:
        raw = datasets.load_dataset(HUB_DATASET, spec.name)
    except ConnectionError as err:
        raise ConnectionError(
            f"{HUB_DATASET}/{spec.name} is not on disk and the Hugging Face hub cannot be reached ({err}). "
            f"To train offline, set {DATA_DIR_ENV} (or data_dir=...) to a folder holding glue/ "
            "(e.g. ../shared/data; the Makefile sets it), or pass source='local'."
        ) from err
    features = glue_features(spec)
    out = {}
    for split, hub_split in spec.hub_splits.items():
        if hub_split not in raw:
            raise DataFormatError(f"{HUB_DATASET}/{spec.name} has no split {hub_split!r}; found {sorted(raw)}.")
        ds = raw[hub_split]
        _check_hub_schema(ds, features, f"{HUB_DATASET}/{spec.name}[{hub_split}]")
        out[split] = ds.select_columns(list(features))
    return DatasetDict(out)


def _check_hub_schema(ds: Dataset, features: Features, where: str) -> None:
    """Fail loudly if the hub changed the columns or the label encoding."""
    missing = [c for c in features if c not in ds.column_names]
    if missing:
        raise DataFormatError(f"{where}: missing column(s) {missing}; found {ds.column_names}.")
    got, want = ds.features["label"], features["label"]
    if isinstance(want, ClassLabel):
        if not isinstance(got, ClassLabel) or list(got.names) != list(want.names):
            raise DataFormatError(f"{where}: label feature {got} differs from the expected {want}.")
    elif not (isinstance(got, Value) and got.dtype.startswith("float")):
        raise DataFormatError(f"{where}: label feature {got} is not a float score.")


# ----------------------------------------------------------------------- subsample


def subsample(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """Take a deterministic random subset of ``n`` examples.

    The dataset is shuffled with ``seed`` and the first ``n`` rows are kept,
    so the subset for a smaller ``n`` is a prefix of that for a larger one.

    Args:
        dataset (datasets.Dataset): The dataset.
        n (int | None): Number of examples; ``None`` or ``n >= len(dataset)``
            returns ``dataset`` unchanged (not shuffled).
        seed (int): Shuffle seed.

    Returns:
        datasets.Dataset: The subset.

    Raises:
        ValueError: If ``n`` is not positive.
    """
    if n is None or n >= len(dataset):
        return dataset
    if n <= 0:
        raise ValueError(f"subsample size must be positive, got {n}.")
    return dataset.shuffle(seed=seed).select(range(n))


def heldout_split(dataset: Dataset, fraction: float, min_examples: int, seed: int) -> tuple[Dataset, Dataset, dict]:
    """Carve a fixed model-selection split out of the training examples.

    The split depends on ``(len(dataset), fraction, min_examples, seed)`` only,
    so every method and every training seed of a task holds out the same
    examples and trains on the same rest. Size: ``max(min_examples,
    round(fraction · len))``, at most half of the examples.

    Returns:
        ``(train, heldout, info)``: the remaining training examples, the held-out
        ones, and ``info`` for the run record (sizes, seed, and a hash of the
        held-out row indices into ``dataset``).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"selection.fraction={fraction} must be in (0, 1), e.g. 0.1")
    size = max(int(min_examples), int(round(fraction * len(dataset))))
    if size > len(dataset) // 2:
        raise ValueError(
            f"a held-out split of {size} examples leaves too few of the {len(dataset)} training examples; "
            "lower selection.min_examples or raise task.max_train_samples"
        )
    order = np.random.default_rng(seed).permutation(len(dataset))
    held, kept = np.sort(order[:size]), np.sort(order[size:])
    digest = hashlib.sha256(held.astype(np.int64).tobytes()).hexdigest()[:16]
    info = {"split": "heldout", "size": int(size), "train_size": int(len(kept)), "fraction": fraction,
            "min_examples": int(min_examples), "seed": int(seed), "indices_sha256": digest}
    return dataset.select(kept.tolist()), dataset.select(held.tolist()), info


def dev_halves(labels: np.ndarray | list, seed: int, regression: bool = False, score_bins: int = 5) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split a dev set once into a validation half and a test half, stratified by label.

    Within each stratum (a class; for a regression task such as STS-B, a score
    bin of width ``max / score_bins`` over ``[0, max]``) the examples are
    permuted with ``seed`` and the first ``ceil(k / 2)`` go to the validation
    half; strata are taken in sorted order. The split depends on the labels
    and ``seed`` only, so every method, learning rate and training seed of a
    task sees the same halves, in every process.

    Args:
        labels: Shape ``(N,)``: class ids, or float scores when ``regression``.
        seed: The split's seed.
        regression: Stratify by score bins instead of classes.
        score_bins: Number of equal-width score bins (regression only).

    Returns:
        ``(validation, test, info)``: sorted row indices of the two halves
        (disjoint, together ``range(N)``) and ``info`` for the run record
        (seed, sizes, strata, and a hash of the validation indices).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) < 2:
        raise ValueError(f"dev_halves needs a 1-D array of at least 2 labels, got shape {labels.shape}")
    if regression:
        top = float(labels.max()) or 1.0
        strata = np.minimum((labels / top * score_bins).astype(np.int64), score_bins - 1)
    else:
        strata = labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    validation = []
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        members = members[rng.permutation(len(members))]
        validation.append(members[: (len(members) + 1) // 2])
    validation = np.sort(np.concatenate(validation))
    test = np.setdiff1d(np.arange(len(labels)), validation)
    digest = hashlib.sha256(validation.astype(np.int64).tobytes()).hexdigest()[:16]
    info = {"split": "dev_halves", "seed": int(seed), "validation_size": int(len(validation)), "test_size": int(len(test)),
            "strata": ("score_bins" if regression else "label"), **({"score_bins": int(score_bins)} if regression else {}),
            "validation_indices_sha256": digest}
    return validation, test, info


# ---------------------------------------------------------------------- tokenise


def tokenize_glue(
    dsdict: DatasetDict,
    tokenizer: Any,
    task: str,
    max_length: int,
    cache_dir: str | os.PathLike[str] | None = None,
) -> DatasetDict:
    """Tokenise every split (truncation, no padding) and keep ``labels``.

    Padding is left to the collator (:func:`glue_collator`). Results are cached
    in ``cache_dir`` as ``glue-<task>-<split>-<key>.arrow`` where ``key`` hashes
    the task, split, tokenizer (class, ``name_or_path``, size, vocabulary),
    ``max_length`` and the input dataset's fingerprint (for local files: a hash
    of the file bytes; subsets from :func:`subsample` derive it
    deterministically). A second call with the same inputs loads the file.

    Args:
        dsdict (datasets.DatasetDict): Output of :func:`load_glue` (possibly
            subsampled).
        tokenizer (Any): A ``transformers`` tokenizer.
        task (str): Task name, for the text columns and the label dtype.
        max_length (int): Truncation length in tokens.
        cache_dir (str | os.PathLike | None): Cache folder; defaults to
            ``$HF_DATASETS_CACHE/melora/tokenized``.

    Returns:
        datasets.DatasetDict: Per split ``input_ids``, ``attention_mask``
        (and ``token_type_ids`` if the tokenizer makes them) and ``labels``
        (int64 class ids; float32 for STS-B). Text columns and ``idx`` are
        dropped so that batches feed a model directly.
    """
    spec = get_task(task)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tok_key = tokenizer_fingerprint(tokenizer)
    out = {}
    for split, ds in dsdict.items():
        key = stable_hash("glue-tok", _TOKENIZE_VERSION, spec.name, split, tok_key, max_length, ds._fingerprint)
        out[split] = ds.map(
            _tokenize_batch,
            batched=True,
            fn_kwargs={
                "tokenizer": tokenizer,
                "text_fields": spec.text_fields,
                "max_length": max_length,
                "regression": spec.is_regression,
            },
            remove_columns=ds.column_names,
            cache_file_name=str(root / f"glue-{spec.name}-{split}-{key}.arrow"),
            load_from_cache_file=True,
            new_fingerprint=key,
            desc=f"Tokenising {spec.name}/{split}",
        )
    return DatasetDict(out)


def _tokenize_batch(
    batch: dict[str, list[Any]],
    tokenizer: Any,
    text_fields: tuple[str, ...],
    max_length: int,
    regression: bool,
) -> dict[str, Any]:
    """Tokenise one batch of single sentences or sentence pairs."""
    enc = tokenizer(*(batch[f] for f in text_fields), truncation=True, max_length=max_length)
    out = dict(enc)
    out["labels"] = np.asarray(batch["label"], dtype=np.float32 if regression else np.int64)
    return out


def glue_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> Any:
    """Return the dynamic-padding collator for tokenised GLUE batches.

    Args:
        tokenizer (Any): The tokenizer used in :func:`tokenize_glue`.
        pad_to_multiple_of (int | None): Optional padding multiple (e.g. 8 for
            tensor cores).

    Returns:
        transformers.DataCollatorWithPadding: Pads ``input_ids``,
        ``attention_mask`` and ``token_type_ids`` to the longest in the batch.
    """
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
