"""MMLU, 5-shot, direct answer (instruct-eval / Hendrycks et al. protocol).

Prompt for subject ``s`` with dev shots ``d_1..d_k`` and test question ``q``::

    The following are multiple choice questions (with answers) about <s>.\\n\\n
    <d_1 question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: <letter>\\n\\n
    ...
    <q question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

``<s>`` is the subject with underscores replaced by single spaces (the original
``format_subject`` also adds a leading space, giving "about  abstract algebra";
this harness does not reproduce that double space). Question texts are used
verbatim, including the leading spaces some MMLU questions have. Shots are the
first ``n_shots`` rows of the subject's dev split, dropped from the end while the
prompt does not fit.

Scoring: greedy generation of ``max_new_tokens`` (instruct-eval: 2) and the
first answer letter read by :func:`extract_choice`; or, with
``scoring="loglik"``, the choice among " A"/" B"/" C"/" D" with the highest
next-token log-probability. Accuracy is the micro average over all test
questions (instruct-eval's "weighted accuracy"); the per-subject accuracies and
their plain mean (``macro_accuracy``) are reported too.

``max_examples`` applies per subject.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from melora.instructeval.data import MMLU_HUB, describe_source, load_mmlu, subsample
from melora.instructeval.fewshot import fewshot_fields, fit_shots, input_budget
from melora.instructeval.generation import continuation_ids, continuation_logprobs, generate_batch, next_token_logprobs
from melora.instructeval.results import make_result, mean

CHOICES = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"

_LEADING_CHOICE = re.compile(r"^\(?([ABCD])(?![A-Za-z])")
_ANY_CHOICE = re.compile(r"\b([ABCD])\b")


def format_subject(subject: str) -> str:
    """``"high_school_us_history"`` -> ``"high school us history"``."""
    return subject.replace("_", " ")


def format_mmlu_example(example: dict[str, Any], include_answer: bool = True) -> str:
    """One question block; with the answer it ends ``"Answer: X\\n\\n"``, else ``"Answer:"``.

    Args:
        example: ``{"question": str, "choices": [str] * 4, "answer": int}``.
    """
    text = example["question"]
    for letter, choice in zip(CHOICES, example["choices"], strict=True):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if include_answer:
        text += f" {CHOICES[example['answer']]}\n\n"
    return text


def build_mmlu_prompt(
    subject: str, shots: Sequence[dict[str, Any]], example: dict[str, Any]
) -> str:
    """Header, the given shots with answers, then the question ending in ``"Answer:"``."""
    prompt = HEADER.format(subject=format_subject(subject))
    prompt += "".join(format_mmlu_example(s) for s in shots)
    return prompt + format_mmlu_example(example, include_answer=False)


def extract_choice(generation: str) -> str | None:
    """The answer letter in a generation, or ``None``.

    A letter A-D at the start (after whitespace, optionally after "(") and not
    followed by another letter wins ("B", " B.", "(B)", "B\\n"); otherwise the
    first stand-alone capital A-D ("The answer is C").
    """
    text = generation.strip()
    m = _LEADING_CHOICE.match(text) or _ANY_CHOICE.search(text)
    return m.group(1) if m else None


def score_mmlu(generations: Sequence[str], answers: Sequence[int | str]) -> list[bool]:
    """Per-question correctness of generations.

    Args:
        generations: model continuations after ``"Answer:"``.
        answers: gold answers as indices 0-3 or letters.
    """
    gold = [CHOICES[a] if isinstance(a, int) else a for a in answers]
    return [extract_choice(g) == a for g, a in zip(generations, gold, strict=True)]


def predict_mmlu_loglik(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 8,
    *,
    max_input_tokens: int | None = None,
) -> list[str]:
    """Letter whose continuation (" A".." D") is most likely after each prompt.

    When each letter is one token after the prompt (the usual case), one forward
    pass per prompt compares the next-token log-probabilities; otherwise the
    summed log-probability of each multi-token continuation is compared.

    Returns:
        One letter per prompt.
    """
    conts = [" " + c for c in CHOICES]
    cont_ids = [[continuation_ids(tokenizer, p, c) for c in conts] for p in prompts]
    single = [i for i, ids in enumerate(cont_ids) if all(len(t) == 1 for t in ids)]
    single_set = set(single)
    multi = [i for i in range(len(prompts)) if i not in single_set]
    preds: list[str] = [""] * len(prompts)
    if single:
        # The letter tokens are the same for every prompt ending in "Answer:".
        by_ids: dict[tuple[int, ...], list[int]] = {}
        for i in single:
            by_ids.setdefault(tuple(t[0] for t in cont_ids[i]), []).append(i)
        for token_ids, rows in by_ids.items():
            lp = next_token_logprobs(
                model, tokenizer, [prompts[i] for i in rows], token_ids, batch_size,
                max_input_tokens=max_input_tokens,
            )
            for r, i in enumerate(rows):
                preds[i] = CHOICES[int(lp[r].argmax())]
    if multi:
        scores = continuation_logprobs(
            model, tokenizer, [prompts[i] for i in multi for _ in conts],
            [c for _ in multi for c in conts], batch_size, max_input_tokens=max_input_tokens,
        )
        for r, i in enumerate(multi):
            row = scores[r * len(conts) : (r + 1) * len(conts)]
            preds[i] = CHOICES[max(range(len(conts)), key=row.__getitem__)]
    return preds


def evaluate_mmlu(
    model,
    tokenizer,
    *,
    data_dir: str | None = None,
    subjects: Sequence[str] | None = None,
    n_shots: int = 5,
    max_examples: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = 2048,
    max_new_tokens: int = 2,
    scoring: str = "generate",
    return_predictions: bool = False,
) -> dict[str, Any]:
    """MMLU accuracy (see the module docstring for the protocol).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        data_dir: local data root (else ``$MELORA_DATA_DIR``, else the hub).
        subjects: subjects to run; default all.
        n_shots: dev shots per prompt (5).
        max_examples: test questions per subject, subsampled with ``seed``.
        seed: subsampling seed.
        batch_size: prompts per forward pass.
        max_length: context window, prompt plus generated tokens.
        max_new_tokens: generated tokens (also reserved when fitting shots).
        scoring: ``"generate"`` (greedy, first letter) or ``"loglik"``.
        return_predictions: add per-question predictions to the result.

    Returns:
        A result dict (:mod:`melora.instructeval.results`), headline ``accuracy``.
    """
    if scoring not in ("generate", "loglik"):
        raise ValueError(f"scoring must be 'generate' or 'loglik', got {scoring!r}")
    start = time.perf_counter()
    data = load_mmlu(data_dir, subjects)
    items: list[dict[str, Any]] = []
    for subject, splits in data.items():
        shots = splits["dev"][:n_shots]
        tests = subsample(list(enumerate(splits["test"])), max_examples, seed, subject)
        for index, example in tests:
            fitted = fit_shots(
                tokenizer,
                lambda k, s=subject, sh=shots, ex=example: build_mmlu_prompt(s, sh[:k], ex),
                len(shots), max_length, max_new_tokens,
            )
            items.append({"subject": subject, "index": index, "example": example, "fitted": fitted})

    prompts = [it["fitted"].text for it in items]
    budget = input_budget(max_length, max_new_tokens)
    if scoring == "generate":
        generations = generate_batch(
            model, tokenizer, prompts, max_new_tokens, batch_size, max_input_tokens=budget
        )
        letters = [extract_choice(g) for g in generations]
    else:
        letters = predict_mmlu_loglik(
            model, tokenizer, prompts, batch_size, max_input_tokens=budget
        )
        generations = [None] * len(prompts)

    per_subject: dict[str, list[bool]] = {s: [] for s in data}
    predictions = []
    for it, gen, letter in zip(items, generations, letters, strict=True):
        gold = CHOICES[it["example"]["answer"]]
        per_subject[it["subject"]].append(letter == gold)
        predictions.append(
            {
                "subject": it["subject"], "index": it["index"], "generation": gen,
                "prediction": letter, "answer": gold, "correct": letter == gold,
                "n_shots": it["fitted"].n_shots,
            }
        )
    all_correct = [c for cs in per_subject.values() for c in cs]
    per_subtask = {
        s: {"accuracy": mean(cs), "n": len(cs)} for s, cs in per_subject.items() if cs
    }
    return make_result(
        task="mmlu",
        metric="accuracy",
        metrics={
            "accuracy": mean(all_correct),
            "macro_accuracy": mean(v["accuracy"] for v in per_subtask.values()),
        },
        per_subtask=per_subtask,
        n_examples=len(all_correct),
        **fewshot_fields(n_shots, items),
        generation={
            "max_new_tokens": max_new_tokens, "max_length": max_length,
            "batch_size": batch_size, "stop": None, "scoring": scoring,
        },
        max_examples=max_examples,
        max_examples_scope="per_subtask",
        seed=seed,
        data_source=describe_source("mmlu", MMLU_HUB, data_dir),
        time_s=time.perf_counter() - start,
        predictions=predictions if return_predictions else None,
    )
