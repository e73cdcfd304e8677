"""Alpaca instruction tuning data (MELoRA paper, Table 3).

Loading (local JSON or hub), the train/dev hold-out, the Stanford Alpaca prompt
template, response-only tokenisation, a causal-LM collator and a length-grouped
sampler.

Tokenisation builds ``prefix + prompt_ids + response_ids [+ eos]`` where the
prompt and the response are tokenised separately (``add_special_tokens=False``)
and ``prefix`` is the tokenizer's own leading special tokens (e.g. LLaMA's
``<s>``; none for GPT-2 style tokenizers). Tokenising the concatenated text
instead could merge characters across the prompt/response boundary into one
token, and the prompt length measured on the prompt alone would then mask the
wrong positions. With separate tokenisation the prompt tokens are exactly those
the model sees at inference (``prefix + prompt_ids``), and every label that is
not ``-100`` is a response (or EOS) token. The price: a SentencePiece tokenizer
may start the response with a word-initial piece (``"▁The"``) where tokenising
the whole text would not; generation is unaffected since it starts after the
prompt.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import torch
from datasets import Dataset, DatasetDict, Features, Value

from melora.experiments.data.cache import stable_hash, tokenizer_fingerprint
from melora.experiments.data.errors import DataFormatError
from melora.experiments.data.paths import DATA_DIR_ENV, resolve_data_dir

__all__ = [
    "HUB_DATASET",
    "HUB_DATASET_ORIGINAL",
    "DEFAULT_LOCAL_FILE",
    "PROMPT_WITH_INPUT",
    "PROMPT_NO_INPUT",
    "IGNORE_INDEX",
    "load_alpaca",
    "train_dev_split",
    "build_prompt",
    "tokenize_alpaca",
    "CausalLMCollator",
]

logger = logging.getLogger(__name__)

# The official MELoRA script trains on the cleaned Alpaca release.
HUB_DATASET = "yahma/alpaca-cleaned"
HUB_DATASET_ORIGINAL = "tatsu-lab/alpaca"
# Used when no file is named but a data folder is known: the largest real
# subset in the offline folder.
DEFAULT_LOCAL_FILE = "alpaca_small_2000.json"
FIELDS = ("instruction", "input", "output")
IGNORE_INDEX = -100
# Part of the tokenisation cache key: bump when the output format changes.
_TOKENIZE_VERSION = 1

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


# ---------------------------------------------------------------------- loading


def load_alpaca(
    path_or_name: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load Alpaca-format data as a Dataset with ``instruction``, ``input``, ``output``.

    Resolution rule:

    * a name ending in ``.json`` (or any existing file path) is a local file:
      used as given if it exists, else looked up as ``<data_dir>/alpaca/<name>``;
    * any other name is a hub dataset (``"yahma/alpaca-cleaned"``,
      ``"tatsu-lab/alpaca"``), loaded with its ``train`` split;
    * ``None`` means ``<data_dir>/alpaca/alpaca_small_2000.json`` when a data
      folder is known, else the hub's ``yahma/alpaca-cleaned``.

    ``data_dir`` defaults to ``$MELORA_DATA_DIR``. A record's ``input`` may be
    missing or ``null`` (read as ``""``); extra fields are dropped.

    Args:
        path_or_name (str | os.PathLike | None): File path, file name in the
            data folder, or hub dataset name.
        data_dir (str | os.PathLike | None): Offline data folder.

    Returns:
        datasets.Dataset: Columns ``instruction``, ``input``, ``output`` (str).

    Raises:
        FileNotFoundError: The local file does not exist.
        DataFormatError: The file is not a JSON list of records with string
            ``instruction``/``output`` fields; names the file and record index.
    """
    root = resolve_data_dir(data_dir)
    if path_or_name is None:
        if root is None:
            return _load_hub(HUB_DATASET)
        return _load_json(root / "alpaca" / DEFAULT_LOCAL_FILE)
    path = Path(path_or_name)
    if path.is_file():
        return _load_json(path)
    if path.suffix == ".json" or isinstance(path_or_name, os.PathLike):
        return _load_json(_find_local(path, root))
    return _load_hub(str(path_or_name))


def _find_local(path: Path, root: Path | None) -> Path:
    """Resolve a non-existing path relative to ``<data_dir>/alpaca``."""
    candidate = root / "alpaca" / path if root is not None and not path.is_absolute() else None
    if candidate is not None and candidate.is_file():
        return candidate
    looked = [str(path)] + ([str(candidate)] if candidate is not None else [])
    hint = "" if root is not None else f" (set data_dir or {DATA_DIR_ENV} to look in <data_dir>/alpaca/)"
    raise FileNotFoundError(f"Alpaca file not found; looked at {looked}{hint}.")


def _load_json(path: Path) -> Dataset:
    """Read and validate a JSON list of Alpaca records."""
    if not path.is_file():
        raise FileNotFoundError(f"Alpaca file not found: {path}.")
    try:
        with path.open(encoding="utf-8") as fh:
            records = json.load(fh)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "expected a JSON list of {instruction, input, output} records."
        ) from err
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: top level is {type(records).__name__}, expected a JSON list of records.")
    return Dataset.from_dict(_validated_columns(records, str(path)))


def _load_hub(name: str) -> Dataset:
    """Load a hub Alpaca dataset's train split and validate it.

    The result stays backed by the hub's cached Arrow files, so its
    fingerprint (and so the tokenisation cache) is stable across runs.
    """
    # Called through the module attribute so tests can monkeypatch it.
    ds = datasets.load_dataset(name, split="train")
    where = f"hub dataset {name}"
    missing = [f for f in ("instruction", "output") if f not in ds.column_names]
    if missing:
        raise DataFormatError(f"{where}: missing column(s) {missing}; found {ds.column_names}.")
    for field in ("instruction", "output"):
        if ds.features[field] != Value("string"):
            raise DataFormatError(f"{where}: column {field!r} is {ds.features[field]}, expected strings.")
        nulls = ds.data.column(field).null_count
        if nulls:
            raise DataFormatError(f"{where}: {nulls} record(s) have no {field!r}.")
    if "input" not in ds.column_names:
        ds = ds.add_column("input", [""] * len(ds))
    elif ds.features["input"] != Value("string") or ds.data.column("input").null_count:
        ds = ds.map(_fill_input, batched=True, features=Features({**ds.features, "input": Value("string")}))
    return ds.select_columns(list(FIELDS))


def _fill_input(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
    """Read a missing (null) ``input`` as the empty string."""
    return {"input": ["" if x is None else x for x in batch["input"]]}


def _validated_columns(records: Sequence[Any], where: str) -> dict[str, list[str]]:
    """Check every record and return the three columns."""
    cols: dict[str, list[str]] = {f: [] for f in FIELDS}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise DataFormatError(f"{where}: record {i} is {type(rec).__name__}, expected an object.")
        for field in FIELDS:
            value = rec.get(field)
            if value is None and field == "input":
                value = ""
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"is {type(value).__name__}, expected a string"
                raise DataFormatError(
                    f"{where}: record {i}: field {field!r} {problem}. Each record needs string "
                    "'instruction' and 'output' fields ('input' may be empty)."
                )
            cols[field].append(value)
    if not cols["instruction"]:
        raise DataFormatError(f"{where}: no records.")
    return cols


# ---------------------------------------------------------------------- splitting


def train_dev_split(ds: Dataset, dev_size: int | float = 2000, seed: int = 42) -> DatasetDict:
    """Hold out a random dev set (the paper holds out 2,000 examples).

    Rule for ``dev_size``:

    * an ``int`` is an exact count and must leave at least one training
      example (``dev_size < len(ds)``), else ``ValueError``; nothing is
      clipped silently;
    * a ``float`` in ``(0, 1)`` is a fraction: ``round(dev_size * len(ds))``
      clipped to ``[1, len(ds) - 1]``.

    The split is ``ds.train_test_split(test_size=n_dev, shuffle=True,
    seed=seed)``, as in alpaca-lora, so the same seed gives the same dev set.

    Args:
        ds (datasets.Dataset): The data.
        dev_size (int | float): Dev-set size or fraction.
        seed (int): Shuffle seed.

    Returns:
        datasets.DatasetDict: ``train`` and ``validation``.

    Raises:
        ValueError: If the dataset is too small for ``dev_size`` or
            ``dev_size`` is out of range.
    """
    n_dev = _dev_count(len(ds), dev_size)
    parts = ds.train_test_split(test_size=n_dev, shuffle=True, seed=seed)
    return DatasetDict({"train": parts["train"], "validation": parts["test"]})


def _dev_count(n: int, dev_size: int | float) -> int:
    """Apply the dev-size rule documented in :func:`train_dev_split`."""
    if n < 2:
        raise ValueError(f"Need at least 2 examples to split off a dev set, got {n}.")
    if isinstance(dev_size, bool) or not isinstance(dev_size, (int, float)):
        raise ValueError(f"dev_size must be an int count or a float fraction, got {dev_size!r}.")
    if isinstance(dev_size, float):
        if not 0.0 < dev_size < 1.0:
            raise ValueError(f"A fractional dev_size must be in (0, 1), got {dev_size}.")
        return min(max(round(dev_size * n), 1), n - 1)
    if not 0 < dev_size < n:
        raise ValueError(
            f"dev_size={dev_size} needs more than {dev_size} examples but the dataset has {n}; "
            "pass a smaller count or a fraction such as dev_size=0.1."
        )
    return dev_size


# ---------------------------------------------------------------------- prompting


def build_prompt(example: Mapping[str, Any]) -> str:
    """Format the Stanford Alpaca prompt, ending with ``"### Response:\\n"``.

    Args:
        example (Mapping[str, Any]): A record with ``instruction`` and an
            optional ``input``; the with-input template is used when ``input``
            is non-empty.

    Returns:
        str: The prompt; the training text is ``prompt + example["output"]``.
    """
    extra = example.get("input") or ""
    if extra:
        return PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=extra)
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


# ---------------------------------------------------------------------- tokenising


def tokenize_alpaca(
    ds: Dataset,
    tokenizer: Any,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos: bool = True,
    drop_unsupervised: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Tokenise prompt + response with loss on the response only.

    ``input_ids = prefix + prompt_ids + response_ids``, truncated to
    ``cutoff_len``; EOS is appended when ``add_eos`` and it still fits (as in
    alpaca-lora). See the module docstring for why the parts are tokenised
    separately.

    Args:
        ds (datasets.Dataset): Records with ``instruction``, ``input``,
            ``output``.
        tokenizer (Any): A ``transformers`` tokenizer; it needs an
            ``eos_token`` when ``add_eos``.
        cutoff_len (int): Maximum sequence length in tokens.
        train_on_inputs (bool): If True, labels equal ``input_ids`` (loss on
            the prompt too); else prompt positions are ``-100``.
        add_eos (bool): Append the EOS token when it fits.
        drop_unsupervised (bool): Drop examples whose prompt fills the whole
            ``cutoff_len`` (no label left: they would add nothing and an
            all-``-100`` batch gives a NaN loss). Only applies when
            ``train_on_inputs`` is False; the count is logged.
        cache_dir (str | os.PathLike | None): If given, the result is cached
            there as ``alpaca-<key>.arrow``, ``key`` hashing the tokenizer
            (class, ``name_or_path``, size, vocabulary), the options above and
            the dataset fingerprint; a second call loads the file. Without it,
            in-memory data (local JSON) is not cached and hub data uses
            ``datasets``' own cache next to the hub files.

    Returns:
        datasets.Dataset: Columns ``input_ids``, ``attention_mask``,
        ``labels`` (lists of ints, unpadded).

    Raises:
        ValueError: ``add_eos`` with a tokenizer without EOS token, or
            ``cutoff_len < 1``.
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be positive, got {cutoff_len}.")
    eos_id = tokenizer.eos_token_id
    if add_eos and eos_id is None:
        raise ValueError("The tokenizer has no eos_token; set tokenizer.eos_token or pass add_eos=False.")
    # An explicit fingerprint spares datasets from hashing the tokenizer and
    # is the same in every process.
    prefix = _leading_special_ids(tokenizer)
    eos = eos_id if add_eos else None
    key = stable_hash(
        "alpaca-tok",
        _TOKENIZE_VERSION,
        tokenizer_fingerprint(tokenizer),
        prefix,
        eos,
        cutoff_len,
        train_on_inputs,
        ds._fingerprint,
    )
    cache_kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_kwargs = {"cache_file_name": str(Path(cache_dir) / f"alpaca-{key}.arrow"), "load_from_cache_file": True}
    out = ds.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "prefix": prefix,
            "eos_id": eos,
            "cutoff_len": cutoff_len,
            "train_on_inputs": train_on_inputs,
        },
        remove_columns=ds.column_names,
        new_fingerprint=key,
        desc="Tokenising Alpaca",
        **cache_kwargs,
    )
    if train_on_inputs or not drop_unsupervised:
        return out
    keep = [i for i, labels in enumerate(out["labels"]) if any(t != IGNORE_INDEX for t in labels)]
    if len(keep) < len(out):
        logger.warning(
            "Dropped %d of %d examples whose prompt fills cutoff_len=%d.", len(out) - len(keep), len(out), cutoff_len
        )
        out = out.select(keep)
    return out


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts before the text (e.g. ``<s>``, ``[CLS]``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _tokenize_batch(
    batch: dict[str, list[str]],
    tokenizer: Any,
    prefix: list[int],
    eos_id: int | None,
    cutoff_len: int,
    train_on_inputs: bool,
) -> dict[str, list[list[int]]]:
    """Tokenise a batch of records into ids, mask and labels."""
    prompts = [build_prompt({"instruction": i, "input": x}) for i, x in zip(batch["instruction"], batch["input"])]
    # Truncating each part at cutoff_len changes nothing in the result and
    # avoids "sequence too long" warnings.
    kwargs = {"add_special_tokens": False, "truncation": True, "max_length": cutoff_len}
    prompt_ids = tokenizer(prompts, **kwargs)["input_ids"]
    response_ids = tokenizer(batch["output"], **kwargs)["input_ids"]
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for p_ids, r_ids in zip(prompt_ids, response_ids):
        ids, labels = _assemble(prefix + list(p_ids), list(r_ids), eos_id, cutoff_len, train_on_inputs)
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def _assemble(
    prompt: list[int], response: list[int], eos_id: int | None, cutoff_len: int, train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    """Concatenate, truncate, append EOS if it fits, and mask the prompt."""
    ids = (prompt + response)[:cutoff_len]
    if eos_id is not None and len(ids) < cutoff_len:
        ids.append(eos_id)
    if train_on_inputs:
        return ids, list(ids)
    n_prompt = min(len(prompt), len(ids))
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


# ---------------------------------------------------------------------- batching


@dataclass
class CausalLMCollator:
    """Right-pad causal-LM features into tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0
    and ``labels`` with ``-100`` (ignored by the loss). Other keys are dropped.

    Attributes:
        pad_token_id (int): Id used to pad ``input_ids``.
        pad_to_multiple_of (int | None): Round the padded length up to a
            multiple of this.
        label_pad_token_id (int): Label padding value.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> CausalLMCollator:
        """Build a collator padding with the tokenizer's pad id (given one if it has none: its EOS, else UNK).

        The pad value is masked out by ``attention_mask`` and ``labels``, so
        reusing EOS (LLaMA tokenizers have no pad token) is harmless.

        Args:
            tokenizer (Any): A ``transformers`` tokenizer.
            pad_to_multiple_of (int | None): See the class attributes.

        Returns:
            CausalLMCollator: The collator.

        Raises:
            ValueError: If the tokenizer has neither a pad, EOS nor UNK token.
        """
        from melora.experiments.models import ensure_pad_token

        return cls(pad_token_id=ensure_pad_token(tokenizer), pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of features.

        Args:
            features (Sequence[Mapping[str, Any]]): Items with ``input_ids``
                and optionally ``attention_mask`` and ``labels``.

        Returns:
            dict[str, torch.Tensor]: ``input_ids``, ``attention_mask`` and, if
            the features have them, ``labels``; all int64 of shape
            ``(batch, length)``.
        """
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad([f["input_ids"] for f in features], length, self.pad_token_id),
            "attention_mask": _pad(
                [f.get("attention_mask", [1] * len(f["input_ids"])) for f in features], length, 0
            ),
        }
        if "labels" in features[0]:
            batch["labels"] = _pad([f["labels"] for f in features], length, self.label_pad_token_id)
        return batch


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    """Right-pad integer rows to ``length``."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out
