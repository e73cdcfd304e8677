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
from collections.abc import Sequence
from typing import Any

from melora.experiments.instructeval.data import MMLU_HUB, describe_source, load_mmlu, subsample
from melora.experiments.instructeval.fewshot import EvalSettings, Evaluation
from melora.experiments.instructeval.generation import continuation_ids, continuation_logprobs, generate_batch, next_token_logprobs
from melora.experiments.instructeval.results import mean

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
    settings: EvalSettings | None = None,
    *,
    subjects: Sequence[str] | None = None,
    scoring: str = "generate",
    **overrides: Any,
) -> dict[str, Any]:
    """MMLU accuracy (see the module docstring for the protocol).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        settings: the shared settings (:class:`~melora.experiments.instructeval.fewshot.EvalSettings`);
            here ``n_shots`` (5) are dev rows, ``max_examples`` applies per subject and
            ``max_new_tokens`` defaults to 2 (instruct-eval's).
        subjects: subjects to run; default all.
        scoring: ``"generate"`` (greedy, first letter) or ``"loglik"``.
        **overrides: any settings field, e.g. ``max_examples=20``.

    Returns:
        A result dict (:mod:`melora.experiments.instructeval.results`), headline ``accuracy``.
    """
    if scoring not in ("generate", "loglik"):
        raise ValueError(f"scoring must be 'generate' or 'loglik', got {scoring!r}")
    s = EvalSettings.resolve(settings, overrides, n_shots=5, max_new_tokens=2)
    run = Evaluation("mmlu", s, scope="per_subtask")
    data = load_mmlu(s.data_dir, subjects)
    for subject, splits in data.items():
        shots = splits["dev"][: s.n_shots]
        for index, example in subsample(list(enumerate(splits["test"])), s.max_examples, s.seed, subject):
            fitted = s.fit(tokenizer, lambda k, sj=subject, sh=shots, ex=example: build_mmlu_prompt(sj, sh[:k], ex), len(shots))
            run.add(fitted, subject=subject, index=index, example=example)

    if scoring == "generate":
        generations = generate_batch(model, tokenizer, run.prompts, **s.generate_args())
        letters = [extract_choice(g) for g in generations]
    else:
        letters = predict_mmlu_loglik(model, tokenizer, run.prompts, s.batch_size, max_input_tokens=s.input_budget)
        generations = [None] * len(letters)
    for it, gen, letter in zip(run.items, generations, letters, strict=True):
        gold = CHOICES[it["example"]["answer"]]
        run.score(
            it["subject"], {"accuracy": letter == gold},
            subject=it["subject"], index=it["index"], generation=gen, prediction=letter, answer=gold,
            correct=letter == gold, n_shots=it["fitted"].n_shots,
        )
    per_subtask = run.per_subtask("accuracy")
    return run.result(
        "accuracy",
        {"accuracy": run.micro("accuracy"), "macro_accuracy": mean(v["accuracy"] for v in per_subtask.values())},
        per_subtask,
        data_source=describe_source("mmlu", MMLU_HUB, s.data_dir),
        scoring=scoring,
    )
