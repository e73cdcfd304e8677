"""DROP, 3-shot, with the official answer F1 / exact match.

Prompt (instruct-eval's ``DropSample.as_prompt``)::

    <passage> <question>\\nAnswer: <first gold answer>\\n\\n      (x n_shots)
    <passage> <question>\\nAnswer:

Shots (instruct-eval's ``train_test_split``): ``n_shots`` questions drawn with
``random.Random(seed)`` from the questions that have a single gold answer; every
question whose passage is one of the shots' passages is removed from the
evaluation set. Unlike instruct-eval, the evaluation set is not restricted to
single-answer questions, because the official metric below takes the maximum
over all gold answers (instruct-eval needed the filter for its
``prediction.startswith(first_answer)`` score, reported here as
``prefix_match``).

Metric (``drop_eval.py`` of the DROP authors, re-implemented): answers are
lower-cased, split on spaces and hyphens, and each token has punctuation
removed (unless it is a number), numbers written as floats (``"2"`` -> ``"2.0"``,
``"2.50"`` -> ``"2.5"``), articles removed and whitespace fixed. An answer may be
several spans; each span becomes a bag of tokens, predicted and gold bags are
aligned one-to-one to maximise the summed bag F1 (a pair scores 0 when the gold
bag has numbers and none of them is in the predicted bag), and F1 is that sum
divided by the larger number of bags, rounded to 2 decimals. Exact match needs
the same set and number of normalised spans. Both are maximised over the gold
answers. The prediction is the first line of the stripped generation, as one span.

``max_examples`` applies to the total.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from typing import Any

from melora.experiments.instructeval.data import DROP_HUB, describe_source, load_drop, subsample
from melora.experiments.instructeval.fewshot import EvalSettings, Evaluation
from melora.experiments.instructeval.generation import generate_batch

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)

Answer = str | Sequence[str]


# --------------------------------------------------------------------------- metric


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normalize_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCTUATION)
    if _is_number(token):
        token = str(float(token))
    token = _ARTICLES.sub(" ", token)
    return " ".join(token.split())


def normalize_drop_answer(text: str) -> str:
    """DROP's answer normalisation (see the module docstring).

    >>> normalize_drop_answer("The 2 Yankees-fans")
    '2.0 yankees fans'
    """
    parts = (_normalize_token(t) for t in re.split(" |-", text))
    return " ".join(p for p in parts if p.strip()).strip()


def _answer_to_bags(answer: Answer) -> tuple[list[str], list[set[str]]]:
    spans = [answer] if isinstance(answer, str) else list(answer)
    normalized = [normalize_drop_answer(s) for s in spans]
    return normalized, [set(n.split()) for n in normalized]


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
    common = len(predicted & gold)
    precision = 1.0 if not predicted else common / len(predicted)
    recall = 1.0 if not gold else common / len(gold)
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _numbers_compatible(gold: set[str], predicted: set[str]) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def _max_assignment_total(scores: list[list[float]]) -> float:
    """Largest sum of ``scores[r][c]`` over one-to-one row/column pairings."""
    if not scores or not scores[0]:
        return 0.0
    if len(scores[0]) > len(scores):
        scores = [list(col) for col in zip(*scores)]
    n_cols = len(scores[0])
    if n_cols > 12:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment([[-v for v in row] for row in scores])
        return float(sum(scores[r][c] for r, c in zip(rows, cols)))
    # Exact DP over the set of used columns (columns are the smaller side); scores
    # are >= 0, so leaving a row unmatched is never better than matching it.
    best = {0: 0.0}
    for row in scores:
        nxt = dict(best)
        for used, total in best.items():
            for c in range(n_cols):
                if not used >> c & 1:
                    key = used | 1 << c
                    value = total + row[c]
                    if value > nxt.get(key, -1.0):
                        nxt[key] = value
        best = nxt
    return max(best.values())


def drop_em_f1(predicted: Answer, gold: Answer) -> tuple[float, float]:
    """Exact match and F1 of one prediction against one gold answer.

    Args:
        predicted, gold: an answer as one string (one span) or a sequence of spans.

    Returns:
        ``(em, f1)``, each in [0, 1]; ``f1`` rounded to 2 decimals as officially.
    """
    pred_spans, pred_bags = _answer_to_bags(predicted)
    gold_spans, gold_bags = _answer_to_bags(gold)
    em = float(set(pred_spans) == set(gold_spans) and len(pred_spans) == len(gold_spans))
    scores = [
        [_bag_f1(p, g) if _numbers_compatible(g, p) else 0.0 for p in pred_bags] for g in gold_bags
    ]
    f1 = _max_assignment_total(scores) / max(len(gold_bags), len(pred_bags))
    return em, round(f1, 2)


def drop_metrics(predicted: Answer, golds: Sequence[Answer]) -> tuple[float, float]:
    """``(max em, max f1)`` over the gold answers (each maximised separately)."""
    if not golds:
        raise ValueError("DROP example without gold answers")
    pairs = [drop_em_f1(predicted, g) for g in golds]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


# --------------------------------------------------------------------------- prompts


def format_drop_example(example: dict[str, Any], include_answer: bool = True) -> str:
    """``"<passage> <question>\\nAnswer:"``, plus ``" <answer>\\n\\n"`` with the answer."""
    text = example["passage"].strip() + " " + example["question"].strip() + "\nAnswer:"
    if include_answer:
        text += f" {example['answers'][0]}\n\n"
    return text


def build_drop_prompt(shots: Sequence[dict[str, Any]], example: dict[str, Any]) -> str:
    """The shots with their first answers followed by the example ending in ``"Answer:"``."""
    return "".join(format_drop_example(s) for s in shots) + format_drop_example(example, False)


def select_drop_shots(
    records: Sequence[dict[str, Any]], n_shots: int, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Draws shots among single-answer questions and removes their passages.

    Returns:
        ``(shots, evaluation_records)``; no evaluation record shares a passage
        with a shot.
    """
    candidates = [r for r in records if len(r["answers"]) == 1]
    shots = random.Random(seed).sample(candidates, n_shots) if n_shots else []
    passages = {s["passage"] for s in shots}
    return shots, [r for r in records if r["passage"] not in passages]


def extract_drop_answer(generation: str) -> str:
    """First line of the stripped generation, stripped."""
    return generation.strip().split("\n", 1)[0].strip()


def _answer_type(answers: Sequence[str]) -> str:
    return "number" if _is_number(answers[0].replace(",", "")) else "text"


def evaluate_drop(model, tokenizer, settings: EvalSettings | None = None, **overrides: Any) -> dict[str, Any]:
    """DROP F1 / exact match (see the module docstring for the protocol).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        settings: the shared settings (:class:`~melora.experiments.instructeval.fewshot.EvalSettings`);
            here ``n_shots`` defaults to 3, ``max_examples`` applies to the total, ``seed``
            also draws the shots and ``max_new_tokens`` defaults to 8 (instruct-eval's).
        **overrides: any settings field, e.g. ``n_shots=1``.

    Returns:
        A result dict (:mod:`melora.experiments.instructeval.results`), headline ``f1``; per-subtask
        entries split questions by the type of their first gold answer
        (``number`` or ``text``).
    """
    s = EvalSettings.resolve(settings, overrides, n_shots=3, max_new_tokens=8)
    run = Evaluation("drop", s, scope="total", groups=("number", "text"))
    shots, pool = select_drop_shots(load_drop(s.data_dir), s.n_shots, s.seed)
    for example in subsample(pool, s.max_examples, s.seed, "drop"):
        run.add(s.fit(tokenizer, lambda k, ex=example: build_drop_prompt(shots[:k], ex), len(shots)), example=example)
    generations = generate_batch(model, tokenizer, run.prompts, **s.generate_args())
    for it, gen in zip(run.items, generations, strict=True):
        answers = it["example"]["answers"]
        pred = extract_drop_answer(gen)
        em, f1 = drop_metrics(pred, answers)
        run.score(
            _answer_type(answers), {"f1": f1, "exact_match": em, "prefix_match": pred.startswith(answers[0])},
            id=it["example"]["id"], generation=gen, prediction=pred, answers=answers, em=em, f1=f1,
            n_shots=it["fitted"].n_shots,
        )
    return run.result(
        "f1",
        {m: run.micro(m) for m in ("f1", "exact_match", "prefix_match")},
        run.per_subtask("f1", "exact_match"),
        data_source=describe_source("drop", DROP_HUB, s.data_dir),
    )
