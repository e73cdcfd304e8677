"""The paper's models with random weights, built offline: ``roberta-base`` and LLaMA-2-7B's layers.

No hub is needed: each folder is a ``save_pretrained`` model built from a
transformers config class with the paper model's exact architecture
(:data:`ROBERTA_BASE`, :data:`LLAMA2_7B`), seeded random weights, and a
tokenizer trained in seconds on the local data (byte-level BPE, so no text is
ever unknown). Point a model config at a folder with
``model.source=path model.name_or_path=<folder>``; ``scripts/check_paper.py``
(``make check-paper``) runs every paper configuration on them for a few steps.

What such a folder shows: every weight, activation and adapter shape, dtype,
``n``-divisibility and code path of the paper runs. What it cannot show: any
metric (the weights are random) and GPU-only behaviour (bf16 speed, memory at
full batch, multi-GPU).

Folders are cached under ``$MELORA_CACHE/paper-shapes/<name>`` (default
``~/.cache/melora``); a folder is rebuilt only when its spec changes. LLaMA
folders hold ``num_hidden_layers`` decoder layers (1 by default: 0.2B weights
per layer plus two 32000 × 4096 embeddings, 0.93 GB in bf16) and are stored in
bf16, the dtype ``configs/model/llama2-7b.yaml`` loads.

:func:`check_data_dir` assembles the data folder for such runs: the real
offline files, plus stand-in TSVs in the ``glue_data`` layout for the GLUE
files this machine lacks (MNLI, QQP, QNLI's train split), made of real local
sentences with cycling labels. They check shapes and code paths, not data.

The check itself: :func:`glue_combinations` and :func:`instruct_combinations`
list the runs (entry point, Hydra overrides, run folder) and
:func:`run_combination` runs one in a fresh interpreter and reads its record.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from melora.experiments.models import DTYPES, cache_root

# Bump when a builder's output changes: cached folders with another version are rebuilt.
BUILDER_VERSION = 1
SPEC_FILE = "paper_shape.json"
COMPLETE = ".complete"

# roberta-base's config.json (the hub's), as RobertaConfig arguments. RobertaConfig()'s own
# defaults differ in three places: 512 positions, 2 token types, layer-norm eps 1e-12.
ROBERTA_BASE: dict[str, Any] = dict(
    vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=514,
    type_vocab_size=1, initializer_range=0.02, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
# roberta-base's special tokens, in id order (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4).
ROBERTA_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

# meta-llama/Llama-2-7b-hf's config.json, as LlamaConfig arguments, less the layer count
# (32 there). LlamaConfig()'s defaults differ in positions (2048) and rms_norm_eps (1e-6).
LLAMA2_7B: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    hidden_act="silu", max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_bias=False, mlp_bias=False,
)
# LLaMA-2's special tokens, in id order (<unk>=0, <s>=1, </s>=2); it has no pad token.
LLAMA_SPECIAL = ("<unk>", "<s>", "</s>")

# Files of the offline data folder (data/README.md) that the paper runs need and it lacks.
STANDIN_FILES = {"MNLI": ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"), "QQP": ("train.tsv", "dev.tsv"), "QNLI": ("train.tsv",)}
STANDIN_ROWS = 512
STANDIN_NOTE = "STANDIN.txt"


def shapes_root(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the folders live: ``cache`` or ``$MELORA_CACHE/paper-shapes``."""
    return Path(cache) if cache is not None else cache_root() / "paper-shapes"


# ---------------------------------------------------------------- local text


def glue_text(data_dir: Path) -> Iterator[str]:
    """Every line of the local GLUE TSVs (sentences, labels and ids alike)."""
    for path in sorted((data_dir / "glue").glob("*/*.tsv")):
        with path.open(encoding="utf-8-sig") as f:
            yield from f


def alpaca_text(data_dir: Path) -> Iterator[str]:
    """The instruction, input and output of every local Alpaca record."""
    for path in sorted((data_dir / "alpaca").glob("*.json")):
        for record in json.loads(path.read_text()):
            yield from (record.get(k, "") for k in ("instruction", "input", "output"))


def _data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    from melora.experiments.data.paths import DATA_DIR_ENV, resolve_data_dir

    root = resolve_data_dir(data_dir)
    if root is None or not (root / "glue").is_dir():
        raise FileNotFoundError(f"no local GLUE data: set {DATA_DIR_ENV} (or --data-dir) to the shared data folder (../shared/data)")
    return root


# ---------------------------------------------------------------- tokenizers


def _byte_level_bpe(texts: Iterator[str], vocab_size: int, special: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def roberta_tokenizer(data_dir: Path, vocab_size: int = ROBERTA_BASE["vocab_size"]):
    """A ``RobertaTokenizerFast`` trained on the local GLUE text: byte-level BPE, roberta-base's special ids.

    roberta-base's own tokenizer is byte-level BPE with these special tokens
    too; the merges differ (GLUE text here, web text there).
    """
    from transformers import RobertaTokenizerFast

    bpe = _byte_level_bpe(glue_text(data_dir), vocab_size, ROBERTA_SPECIAL)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)  # vocab.json + merges.txt: what RobertaTokenizerFast reads in every transformers version
        tokenizer = RobertaTokenizerFast.from_pretrained(tmp, model_max_length=512)
    for key in ("is_local", "local_files_only"):  # from_pretrained's own arguments, not the tokenizer's
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def llama_tokenizer(data_dir: Path, vocab_size: int = LLAMA2_7B["vocab_size"]):
    """A fast tokenizer with LLaMA-2's special ids (<unk>=0, <s>=1, </s>=2) that prepends <s>.

    Trained on the local Alpaca and GLUE text. LLaMA-2's own is a SentencePiece
    BPE with byte fallback; byte-level BPE has the same property that matters
    here (no text is unknown) and the same id range.
    """
    from itertools import chain

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = _byte_level_bpe(chain(alpaca_text(data_dir), glue_text(data_dir)), vocab_size, LLAMA_SPECIAL)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096)


# ---------------------------------------------------------------- folders


def _build_roberta(folder: Path, spec: dict, data_dir: Path) -> None:
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(**spec["config"], architectures=["RobertaForMaskedLM"])
    torch.manual_seed(spec["seed"])
    RobertaForMaskedLM(config).save_pretrained(folder)  # roberta-base's checkpoint class: GLUE adds a fresh head
    roberta_tokenizer(data_dir, config.vocab_size).save_pretrained(folder)


def _build_llama(folder: Path, spec: dict, data_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec["config"], architectures=["LlamaForCausalLM"])
    torch.manual_seed(spec["seed"])
    # Initialised in the storage dtype: a 7B-wide layer in fp32 first would double the peak memory.
    model = LlamaForCausalLM._from_config(config, dtype=DTYPES[spec["dtype"]])
    model.save_pretrained(folder)
    llama_tokenizer(data_dir, config.vocab_size).save_pretrained(folder)


BUILDERS = {"roberta": _build_roberta, "llama": _build_llama}


def folder_spec(name: str, num_hidden_layers: int = 1, dtype: str = "bf16", vocab_size: int | None = None, seed: int = 0) -> dict:
    """What a folder holds: architecture, storage dtype, seed (the cache key).

    Args:
        name: ``roberta-base`` or ``llama2-7b``.
        num_hidden_layers: LLaMA decoder layers (LLaMA-2-7B has 32); ignored for roberta-base (12).
        dtype: LLaMA storage dtype (``bf16`` or ``fp32``); roberta-base is stored in fp32, as on the hub.
        vocab_size: A cut vocabulary (tests only); ``None``: the paper model's.
    """
    if name == "roberta-base":
        config = dict(ROBERTA_BASE)
        kind, dtype = "roberta", "fp32"
    elif name == "llama2-7b":
        config = dict(LLAMA2_7B, num_hidden_layers=int(num_hidden_layers))
        kind = "llama"
    else:
        raise ValueError(f"no paper-shape folder called {name!r}; use roberta-base or llama2-7b")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; use one of {sorted(DTYPES)}")
    if vocab_size is not None:
        config["vocab_size"] = int(vocab_size)
    return {"name": name, "kind": kind, "config": config, "dtype": dtype, "seed": seed, "builder_version": BUILDER_VERSION}


def folder_name(spec: dict) -> str:
    """``roberta-base``, ``llama2-7b-1layer-bf16`` (and ``-vocab<k>`` when the vocabulary is cut)."""
    if spec["kind"] == "roberta":
        name = spec["name"]
    else:
        layers = spec["config"]["num_hidden_layers"]
        name = f"{spec['name']}-{layers}layer{'s' if layers != 1 else ''}-{spec['dtype']}"
    default = (ROBERTA_BASE if spec["kind"] == "roberta" else LLAMA2_7B)["vocab_size"]
    if spec["config"]["vocab_size"] != default:
        name += f"-vocab{spec['config']['vocab_size']}"
    return name


def paper_shape_folder(name: str, cache: str | os.PathLike[str] | None = None, data_dir: str | os.PathLike[str] | None = None,
                       rebuild: bool = False, **spec_args: Any) -> Path:
    """The cached folder of :func:`folder_spec` ``(name, **spec_args)``, built on first use.

    Built in a temporary folder and renamed into place, so an interrupted build
    leaves nothing that looks complete. ``rebuild`` builds it again.

    Returns:
        The folder, for ``model.source=path model.name_or_path=<folder>``.
    """
    spec = folder_spec(name, **spec_args)
    root = shapes_root(cache)
    target = root / folder_name(spec)
    if not rebuild and (target / COMPLETE).exists() and _read_spec(target) == spec:
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}-"))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        BUILDERS[spec["kind"]](tmp, spec, _data_dir(data_dir))
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        (tmp / COMPLETE).touch()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _read_spec(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- data


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _write_tsv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    lines = ["\t".join(header)] + ["\t".join(row.get(col, "") for col in header) for row in rows]
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:  # unchanged bytes keep the tokenisation cache valid
        path.write_text(text)


def _standin_tables(source: Path) -> dict[tuple[str, str], tuple[list[str], list[dict[str, str]]]]:
    """``{(TASK, file): (header, rows)}`` in the glue_data layout, from real local sentences."""
    rte = _tsv_rows(source / "glue" / "RTE" / "train.tsv")[:STANDIN_ROWS]
    rte_dev = _tsv_rows(source / "glue" / "RTE" / "dev.tsv")[:STANDIN_ROWS]
    qnli_dev = _tsv_rows(source / "glue" / "QNLI" / "dev.tsv")
    mnli_labels = ("entailment", "neutral", "contradiction")
    parse = ["sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse"]
    mnli_train = ["index", "promptID", "pairID", "genre", *parse, "sentence1", "sentence2", "label1", "gold_label"]
    mnli_dev = [*mnli_train[:-1], "label2", "label3", "label4", "label5", "gold_label"]

    def mnli(rows):
        return [{"index": str(i), "genre": "standin", "sentence1": r["sentence1"], "sentence2": r["sentence2"],
                 "label1": mnli_labels[i % 3], "gold_label": mnli_labels[i % 3]} for i, r in enumerate(rows)]

    def qqp(rows):  # consecutive QNLI questions as question pairs
        return [{"id": str(i), "qid1": str(2 * i), "qid2": str(2 * i + 1), "question1": a["question"], "question2": b["question"],
                 "is_duplicate": str(i % 2)} for i, (a, b) in enumerate(zip(rows[0::2], rows[1::2]))]

    qnli_header = ["index", "question", "sentence", "label"]
    return {
        ("MNLI", "train.tsv"): (mnli_train, mnli(rte)),
        ("MNLI", "dev_matched.tsv"): (mnli_dev, mnli(rte_dev)),
        ("MNLI", "dev_mismatched.tsv"): (mnli_dev, mnli(rte_dev[::-1])),
        ("QQP", "train.tsv"): (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], qqp(qnli_dev[: 2 * STANDIN_ROWS])),
        ("QQP", "dev.tsv"): (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], qqp(qnli_dev[-2 * STANDIN_ROWS :])),
        ("QNLI", "train.tsv"): (qnli_header, qnli_dev[:STANDIN_ROWS]),
    }


def check_data_dir(target: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, list[str]]:
    """A data folder with every file the paper runs read: the real ones linked, the missing GLUE files stood in for.

    Every entry of the real data folder is linked into ``target``; under
    ``glue/``, each task folder is linked as it is when it has all its files,
    or rebuilt with links to the real files and stand-ins for the missing
    ones (:data:`STANDIN_FILES`): MNLI from RTE sentence pairs with the three
    labels in turn, QQP from pairs of QNLI dev questions, QNLI's train split
    from QNLI dev rows. A folder with the real files (a full ``glue_data``)
    gets no stand-ins.

    Returns:
        ``(target, stand-ins)``: the folder and the ``TASK/file`` names stood in for.
    """
    source = _data_dir(data_dir).resolve()
    target = Path(target)
    (target / "glue").mkdir(parents=True, exist_ok=True)

    def link(src: Path, dst: Path) -> None:
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        dst.symlink_to(src)

    for entry in source.iterdir():
        if entry.name != "glue":
            link(entry, target / entry.name)
    missing = {task: [f for f in files if not (source / "glue" / task / f).is_file()] for task, files in STANDIN_FILES.items()}
    tables = _standin_tables(source) if any(missing.values()) else {}
    standins = []
    for task in sorted({p.name for p in (source / "glue").iterdir()} | set(STANDIN_FILES)):
        src, dst = source / "glue" / task, target / "glue" / task
        if not missing.get(task):
            link(src, dst)
            continue
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        dst.mkdir(exist_ok=True)
        for file in src.iterdir() if src.is_dir() else ():
            if file.name not in missing[task]:
                link(file, dst / file.name)
        for name in missing[task]:
            header, rows = tables[(task, name)]
            _write_tsv(dst / name, header, rows)
            standins.append(f"{task}/{name}")
        (dst / STANDIN_NOTE).write_text(
            f"Stand-ins for {', '.join(missing[task])} (melora.experiments.paper_shapes.check_data_dir): real local sentences in the "
            "glue_data layout with labels in turn. They check shapes and code paths, not data.\n"
        )
    return target, standins



# ---------------------------------------------------------------- the check

GLUE_TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")
def spec_methods(spec: str, profile: str = "paper") -> dict[str, tuple[str, ...]]:
    """The methods of an experiment spec at ``profile``, by the tag their run folder takes.

    A comma list (``"method.n=2,4,8"``) gives one method per value.
    """
    import itertools

    from omegaconf import OmegaConf

    from melora.experiments.specs import CONFIGS, load_spec

    methods: dict[str, tuple[str, ...]] = {}
    for group in load_spec(spec)["groups"]:
        if profile not in group.get("profiles", [profile]):
            continue
        for line in group["methods"]:
            for values in itertools.product(*(o.partition("=")[2].split(",") for o in line)):
                overrides = tuple(f"{o.partition('=')[0]}={v}" for o, v in zip(line, values))
                name = next(o.partition("=")[2] for o in overrides if o.startswith("method="))
                node = OmegaConf.create({"method": OmegaConf.load(CONFIGS / "method" / f"{name}.yaml"), "model": {"target_modules": []}})
                for o in overrides:
                    if o.startswith("method."):
                        key, _, value = o.partition("=")
                        OmegaConf.update(node, key, yaml_value(value))
                methods[str(node.method.tag)] = overrides
    return methods


def yaml_value(text: str) -> Any:
    """An override's value as Hydra reads it (``8`` → int, ``1e-3`` → float, else the string)."""
    import yaml

    return yaml.safe_load(text)


# Table 2's rows as the held-out Table 2 runs them: the baselines at rank 8, MELoRA r=8 with
# the official script's n=2 and r=1 with n=8 (the paper's n in {2, 4, 8} changes no code path).
GLUE_METHODS: dict[str, tuple[str, ...]] = spec_methods("table2_heldout", "mini")
# Table 3's defaults of the official script: LoRA r=64 and MELoRA r=1, n=8.
INSTRUCT_METHODS: dict[str, tuple[str, ...]] = {
    tag: o for tag, o in spec_methods("table3", "mini").items() if tag in ("lora_r64", "melora_n8_r1")
}
ALPACA_FILE = "alpaca_small_2000.json"
EVAL_SUBJECT = "abstract_algebra"


@dataclass(frozen=True)
class Cut:
    """What a CPU dry run cuts from the paper profile; lr, max length, warm-up and schedule stay.

    Attributes:
        steps: Optimiser steps per run (``trainer.max_steps``).
        glue_batch: GLUE global batch (paper: 128, CoLA 64).
        glue_train: GLUE training examples (paper: all).
        glue_eval: Examples of each GLUE dev split (paper: all).
        instruct_batch: Alpaca global batch (paper: 128).
        instruct_micro: Alpaca micro-batch (paper: 8; the rest is gradient accumulation).
        instruct_train: Alpaca training examples (paper: all but the dev hold-out).
        instruct_dev: Alpaca dev examples scored (paper: all 2,000).
        instruct_holdout: Alpaca dev hold-out (paper: 2,000, more than half the local file).
        eval_examples: INSTRUCTEVAL questions (MMLU, one subject; paper: every benchmark, whole).
    """

    steps: int = 2
    glue_batch: int = 4
    glue_train: int = 8
    glue_eval: int = 8
    instruct_batch: int = 4
    instruct_micro: int = 2
    instruct_train: int = 8
    instruct_dev: int = 4
    instruct_holdout: int = 100
    eval_examples: int = 1

    def describe(self) -> list[str]:
        return [
            f"cut for CPU: {self.steps} optimiser steps per run (trainer.max_steps); lr, max length, warm-up, weight decay and "
            "the linear schedule are the paper profile's; logger=none",
            f"  GLUE: batch 128 (CoLA 64) -> {self.glue_batch}, training examples -> {self.glue_train}, each dev split -> {self.glue_eval}",
            f"  Alpaca: yahma/alpaca-cleaned (hub) -> {ALPACA_FILE}, batch 128 = micro 8 x 16 -> {self.instruct_batch} = "
            f"{self.instruct_micro} x {self.instruct_batch // self.instruct_micro}, dev hold-out 2000 -> {self.instruct_holdout} "
            f"({self.instruct_dev} scored), training examples -> {self.instruct_train}",
            f"  INSTRUCTEVAL: MMLU 5-shot only, {self.eval_examples} question of {EVAL_SUBJECT} (paper: MMLU, BBH, DROP, HumanEval, whole)",
        ]


@dataclass(frozen=True)
class Combination:
    """One dry run: a Hydra entry point, its overrides and its run folder."""

    label: str
    entry: str
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def record_file(self) -> Path:
        return self.run_dir / ("eval_record.json" if self.entry == "melora.experiments.instructeval" else "record.json")

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", self.entry, *self.overrides, *extra, f"hydra.run.dir={self.run_dir}"]


def glue_combinations(model_dir: Path, data_dir: Path, runs: Path, cut: Cut = Cut(), tasks=GLUE_TASKS,
                      methods=tuple(GLUE_METHODS)) -> list[Combination]:
    """Table 2's runs on the roberta-base folder: ``profile=paper model=roberta-base`` plus the cuts."""
    common = (
        "profile=paper", "model=roberta-base", "model.source=path", f"model.name_or_path={model_dir}", f"data_dir={data_dir}",
        f"cache_dir={runs / 'tokenized'}", "logger=none", "trainer.progress=false", f"trainer.max_steps={cut.steps}",
        f"task.batch_size={cut.glue_batch}", f"task.max_train_samples={cut.glue_train}", f"task.max_eval_samples={cut.glue_eval}",
    )
    return [
        Combination(f"glue/{task} {tag}", "melora.experiments.glue", (*common, f"task=glue/{task}", *GLUE_METHODS[tag]), runs / "glue" / task / tag)
        for task in tasks for tag in methods
    ]


def instruct_combinations(model_dir: Path, data_dir: Path, runs: Path, cut: Cut = Cut(), methods=tuple(INSTRUCT_METHODS),
                          evaluate: bool = True) -> list[Combination]:
    """Table 3's runs on the LLaMA folder (``profile=paper model=llama2-7b``), each followed by its INSTRUCTEVAL run."""
    model = ("profile=paper", "model=llama2-7b", "model.source=path", f"model.name_or_path={model_dir}", f"data_dir={data_dir}")
    train = (
        *model, "logger=none", "trainer.progress=false", f"trainer.max_steps={cut.steps}", f"task.dataset={ALPACA_FILE}",
        f"task.dev_size={cut.instruct_holdout}", f"task.max_train_samples={cut.instruct_train}", f"task.max_dev_samples={cut.instruct_dev}",
        f"task.batch_size={cut.instruct_batch}", f"task.micro_batch_size={cut.instruct_micro}",
    )
    out = []
    for tag in methods:
        run_dir = runs / "instruct" / tag
        out.append(Combination(f"instruct/alpaca {tag}", "melora.experiments.instruct", (*train, *INSTRUCT_METHODS[tag]), run_dir))
        if evaluate:
            evaluation = (*model, f"adapter_dir={run_dir}", "eval.tasks=[mmlu]", f"eval.max_examples={cut.eval_examples}",
                          f"+eval.task_kwargs.mmlu.subjects=[{EVAL_SUBJECT}]")
            out.append(Combination(f"instructeval/mmlu {tag}", "melora.experiments.instructeval", evaluation, runs / "instructeval" / tag))
    return out


@dataclass
class Outcome:
    """How one combination ended: ``ok``, the wall time, and the one-line error or a summary."""

    combination: Combination
    ok: bool
    seconds: float
    message: str
    record: dict | None = None

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.seconds:7.1f} s  {self.combination.label:<34} {self.message}"


_ERROR_LINE = re.compile(r"^(Error: |([A-Za-z_]\w*\.)*[A-Za-z_]\w*(Error|Exception)\b)")
_HYDRA_HINT = "Set the environment variable HYDRA_FULL_ERROR"


def one_line_error(stderr: str, limit: int = 400) -> str:
    """The error of a run's stderr on one line.

    The last exception line (melora's ``Error: …`` or Python's ``XError: …``);
    failing that (Hydra's override errors have none), the last paragraph joined.
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", stderr) if p.strip() and not p.strip().startswith(_HYDRA_HINT)]
    lines = [line.strip() for p in paragraphs for line in p.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line
    if not paragraphs:
        return "no output"
    return " ".join(line.strip() for line in paragraphs[-1].splitlines() if line.strip())[:limit]


def _summary(record: dict) -> str:
    if record.get("kind") == "instructeval":
        return f"{record.get('scores')} on {record.get('n_examples')} (random weights: any score)"
    steps, params = record.get("global_step"), record.get("trainable_params") or 0
    loss = record.get("last_train_loss")
    if loss is None:
        return f"{steps} steps"
    return f"{steps} steps, loss {loss:.4f}, {params / 1e6:.3f}M trainable, rank {record.get('equivalent_rank')}"


def run_combination(combination: Combination, *extra: str, timeout: float = 1800, log_dir: Path | None = None) -> Outcome:
    """Run one combination in a fresh interpreter (as a user would) and read its record.

    ``extra`` overrides go after the combination's own. The run's stdout and
    stderr go to ``<log_dir>/<run folder name>.log`` when ``log_dir`` is given.
    """
    command = combination.command(*extra)
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(combination, False, time.perf_counter() - started, f"timed out after {timeout:.0f} s; raise --timeout")
    seconds = time.perf_counter() - started
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        name = "-".join(combination.run_dir.parts[-2:])
        (log_dir / f"{name}.log").write_text(f"$ {' '.join(command)}\n\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        why = one_line_error(proc.stderr) if proc.returncode > 0 else f"killed by signal {-proc.returncode}"
        return Outcome(combination, False, seconds, why)
    try:
        record = json.loads(combination.record_file.read_text())
    except (OSError, ValueError) as err:
        return Outcome(combination, False, seconds, f"exit 0 but no readable {combination.record_file.name}: {err}")
    if record.get("status") != "completed":
        why = f"record status is {record.get('status')!r}: {record.get('error', '')}".rstrip(": ")
        return Outcome(combination, False, seconds, why, record)
    return Outcome(combination, True, seconds, _summary(record), record)
