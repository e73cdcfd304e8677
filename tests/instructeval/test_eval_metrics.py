"""Scoring of the INSTRUCTEVAL harness: DROP F1/EM, MMLU and BBH answers, aggregation."""

import itertools
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from fixtures.toy import byte_tokenizer, write_toy_data

from melora.experiments.instructeval import bbh as bbh_mod
from melora.experiments.instructeval import drop as drop_mod
from melora.experiments.instructeval import mmlu as mmlu_mod
from melora.experiments.instructeval.bbh import bbh_exact_match, bbh_prefix_match, extract_bbh_answer
from melora.experiments.instructeval.drop import drop_em_f1, drop_metrics, normalize_drop_answer
from melora.experiments.instructeval.humaneval import fix_indents, postprocess_completion
from melora.experiments.instructeval.mmlu import extract_choice, score_mmlu

# --------------------------------------------------------------------------- DROP


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Yankees", "yankees"),
        ("an apple a day", "apple day"),
        ("2", "2.0"),
        ("2,000", "2000.0"),
        ("3.50", "3.5"),
        ("Lions-Bears", "lions bears"),
        ("  Hello,   World!  ", "hello world"),
        ("74.3%", "743.0"),  # official quirk: punctuation goes before the number check
    ],
)
def test_drop_normalization(text, normalized):
    assert normalize_drop_answer(text) == normalized


@pytest.mark.parametrize(
    ("pred", "gold", "em", "f1"),
    [
        ("2000", "2,000", 1.0, 1.0),
        ("2", "2.0", 1.0, 1.0),
        ("the Eagles", "Eagles", 1.0, 1.0),
        # Bags {pakistanis, and, indians} / {pakistanis, and, filipinos}: P = R = 2/3.
        ("Pakistanis and Indians", "Pakistanis and Filipinos", 0.0, 0.67),
        # Gold has a number the prediction lacks: the pair scores 0 despite "yards".
        ("24 yards", "34 yards", 0.0, 0.0),
        # Number present: P = 1/1, R = 1/2 -> F1 = 2/3.
        ("34", "34 yards", 0.0, 0.67),
        ("", "5", 0.0, 0.0),
        # Multi-span, any order.
        (["Chaz Schilens", "JaMarcus Russell"], ["JaMarcus Russell", "Chaz Schilens"], 1.0, 1.0),
        # One of two gold spans: (1 + 0) / 2.
        ("Chaz Schilens", ["Chaz Schilens", "JaMarcus Russell"], 0.0, 0.5),
        # Each predicted span aligns with one gold span at F1 2/3: (2/3 + 2/3) / 2.
        (["Russell", "Schilens"], ["JaMarcus Russell", "Chaz Schilens"], 0.0, 0.67),
        # Extra predicted span: (1 + 1) / 3.
        (["a1", "b1", "c1"], ["a1", "b1"], 0.0, 0.67),
    ],
)
def test_drop_em_f1_hand_computed(pred, gold, em, f1):
    assert drop_em_f1(pred, gold) == (em, f1)


def test_drop_max_over_golds():
    assert drop_metrics("50.6", ["49.7", "50.6"]) == (1.0, 1.0)
    assert drop_metrics("truce", ["truce called", "British"]) == (0.0, 0.67)
    with pytest.raises(ValueError):
        drop_metrics("x", [])


def _brute_force_total(scores):
    n_rows, n_cols = len(scores), len(scores[0])
    if n_rows <= n_cols:
        return max(
            sum(scores[r][c] for r, c in zip(range(n_rows), perm))
            for perm in itertools.permutations(range(n_cols), n_rows)
        )
    return max(
        sum(scores[r][c] for r, c in zip(perm, range(n_cols)))
        for perm in itertools.permutations(range(n_rows), n_cols)
    )


def test_drop_alignment_is_optimal():
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        scores = [[rng.choice([0.0, rng.random()]) for _ in range(m)] for _ in range(n)]
        assert drop_mod._max_assignment_total(scores) == pytest.approx(_brute_force_total(scores))


def test_drop_alignment_large_uses_scipy():
    pytest.importorskip("scipy")
    scores = [[float(i == j) for j in range(14)] for i in range(15)]
    assert drop_mod._max_assignment_total(scores) == 14.0


# --------------------------------------------------------------------------- MMLU / BBH


@pytest.mark.parametrize(
    ("generation", "letter"),
    [
        (" B", "B"), ("B.", "B"), ("(C)", "C"), ("A\n\nQuestion", "A"), (" D is right", "D"),
        (" The answer is C", "C"), ("Both", None), ("", None), (" a", None), ("E", None),
    ],
)
def test_extract_choice(generation, letter):
    assert extract_choice(generation) == letter


def test_score_mmlu_crafted():
    gens = [" B", " C", "(A)", " none", " D."]
    assert score_mmlu(gens, [1, 1, "A", 0, 3]) == [True, False, True, False, True]


def test_bbh_answer_matching():
    assert extract_bbh_answer(" False\n\nnot True is\nAnswer: True") == "False"
    assert extract_bbh_answer("\n (A)\n") == "(A)"
    assert bbh_exact_match(" False\n\nnot True", "False")
    assert bbh_exact_match(" ) ] }", ") ] }")
    assert not bbh_exact_match(" Falsehood", "False")
    assert bbh_prefix_match(" Falsehood", "False")  # instruct-eval's looser criterion
    assert not bbh_exact_match(" True", "False")
    assert not bbh_exact_match("", "False")


def _fake_generate(answers_by_prompt):
    def generate(model, tokenizer, prompts, max_new_tokens, batch_size=8, stop=None, **kw):
        return [answers_by_prompt(p) for p in prompts]

    return generate


def test_mmlu_aggregation_micro_and_macro(tmp_path, monkeypatch):
    root = write_toy_data(tmp_path)
    # Arithmetic: always "A" (2 of its 4 test answers are A); colors: always right.
    gold = {
        "What color is blood?": "A", "What color is coal?": "D", "What color is snow?": "C",
        "What color is grass?": "A", "What color is the sky?": "B",
    }

    def answer(prompt):
        question = prompt.rsplit("\n\n", 1)[-1].split("\n", 1)[0]
        return " " + gold.get(question, "A")

    monkeypatch.setattr(mmlu_mod, "generate_batch", _fake_generate(answer))
    res = mmlu_mod.evaluate_mmlu(None, byte_tokenizer(), data_dir=root, max_length=None)
    assert res["per_subtask"]["toy_arithmetic"] == {"accuracy": 0.5, "n": 4}
    assert res["per_subtask"]["toy_colors"] == {"accuracy": 1.0, "n": 5}
    assert res["metrics"]["accuracy"] == pytest.approx(7 / 9)
    assert res["metrics"]["macro_accuracy"] == pytest.approx(0.75)
    assert res["score"] == res["metrics"]["accuracy"]
    assert res["shots"] == {"requested": 5, "mean": 5.0, "min": 5, "max": 5, "n_reduced": 0}

    res = mmlu_mod.evaluate_mmlu(
        None, byte_tokenizer(), data_dir=root, max_length=None, max_examples=2, seed=1,
        return_predictions=True,
    )
    assert res["n_examples"] == 4 and res["max_examples_scope"] == "per_subtask"
    assert {p["subject"] for p in res["predictions"]} == {"toy_arithmetic", "toy_colors"}


def test_bbh_aggregation_macro(tmp_path, monkeypatch):
    root = write_toy_data(tmp_path)
    truth = {"not not True is": "True", "False or False is": "False", "True or False is": "True",
             "Sort: h g": "g h", "Sort: j i": "j i"}  # the last is wrong on purpose

    def answer(prompt):
        question = prompt.rsplit("\n\n", 1)[-1].split("\nAnswer:")[0]
        return " " + truth[question] + "\n\nmore"

    monkeypatch.setattr(bbh_mod, "generate_batch", _fake_generate(answer))
    res = bbh_mod.evaluate_bbh(None, byte_tokenizer(), data_dir=root, max_length=None)
    # 3 shots per task, the rest evaluated: toy_boolean 3/3, toy_words 1/2.
    assert res["per_subtask"]["toy_boolean"]["n"] == 3
    assert res["per_subtask"]["toy_words"] == {"exact_match": 0.5, "prefix_match": 0.5, "n": 2}
    assert res["metrics"]["exact_match"] == pytest.approx(0.75)
    assert res["metrics"]["micro_exact_match"] == pytest.approx(0.8)


def test_drop_evaluation_scores(tmp_path, monkeypatch):
    root = write_toy_data(tmp_path)
    monkeypatch.setattr(drop_mod, "generate_batch", _fake_generate(lambda p: " five\nQ"))
    res = drop_mod.evaluate_drop(None, byte_tokenizer(), data_dir=root, n_shots=1,
                                 max_length=None, return_predictions=True)
    by_question = {p["answers"][0]: p for p in res["predictions"]}
    # Two-answer questions are never shots, so "5|five" is always evaluated.
    assert by_question["5"]["em"] == 1.0 and by_question["5"]["prediction"] == "five"
    assert by_question["7"]["f1"] == 0.0
    assert res["n_examples"] == 5 and res["shots"]["requested"] == 1
    assert set(res["per_subtask"]) <= {"number", "text"}
    assert res["metrics"]["f1"] == pytest.approx(sum(p["f1"] for p in res["predictions"]) / 5)


# --------------------------------------------------------------------------- HumanEval text


def test_postprocess_stop_sequences():
    body = "    return x + 1\n"
    for tail in ["\ndef helper():\n", "\nclass A:\n", "\nif __name__ == '__main__':\n",
                 "\nprint(f(1))\n", "\n# test\n"]:
        assert postprocess_completion(body + tail) == body
    indented_comment = "    # comment\n    return 1\n"
    assert postprocess_completion(indented_comment) == indented_comment


def test_postprocess_instruct_eval_style():
    assert fix_indents("   x\n y\n  z") == "    x\n  y\n  z"
    text = "\n   return x\n\n\nprint(1)"
    assert postprocess_completion(text, style="instruct_eval") == "    return x"
    with pytest.raises(ValueError):
        postprocess_completion("x", style="nope")
