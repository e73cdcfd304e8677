"""BIG-Bench Hard, 3-shot, direct answer (instruct-eval protocol).

Shots: instruct-eval does not use the chain-of-thought prompts of
``cot-prompts/`` for direct answering. For each task it takes the task's own
first ``n_shots`` (3) examples as shots and evaluates on all the others; this
harness does the same, so each task is scored on ``len(task) - 3`` examples
(6430 in all). Prompt::

    <shot_1 input>\\nAnswer: <shot_1 target>\\n\\n
    ...
    <input>\\nAnswer:

(no task description, as in instruct-eval). Shots are dropped from the end while
the prompt does not fit.

Scoring: the answer is the first line of the stripped generation (the shots end
each answer with a blank line), compared with the target for exact match after
stripping whitespace. instruct-eval's looser ``generation.strip().startswith(target)``
is reported as ``prefix_match``. The headline is the mean of the per-task exact
match (macro over tasks, as instruct-eval averages task scores); the micro
average over all examples is reported too.

``max_examples`` applies per task (after removing the shots).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from melora.experiments.instructeval.data import BBH_HUB, describe_source, load_bbh, subsample
from melora.experiments.instructeval.fewshot import EvalSettings, Evaluation
from melora.experiments.instructeval.generation import generate_batch
from melora.experiments.instructeval.results import mean


def format_bbh_example(example: dict[str, str], include_answer: bool = True) -> str:
    """``"<input>\\nAnswer: <target>\\n\\n"``, or ``"<input>\\nAnswer:"`` without the answer."""
    text = example["input"] + "\nAnswer:"
    if include_answer:
        text += f" {example['target']}\n\n"
    return text


def build_bbh_prompt(shots: Sequence[dict[str, str]], example: dict[str, str]) -> str:
    """The shots with answers followed by the example ending in ``"Answer:"``."""
    return "".join(format_bbh_example(s) for s in shots) + format_bbh_example(example, False)


def extract_bbh_answer(generation: str) -> str:
    """First line of the stripped generation, stripped."""
    return generation.strip().split("\n", 1)[0].strip()


def bbh_exact_match(generation: str, target: str) -> bool:
    """Whether the extracted answer equals the target (both stripped)."""
    return extract_bbh_answer(generation) == target.strip()


def bbh_prefix_match(generation: str, target: str) -> bool:
    """instruct-eval's criterion: the stripped generation starts with the target."""
    return generation.strip().startswith(target)


def evaluate_bbh(
    model, tokenizer, settings: EvalSettings | None = None, *, tasks: Sequence[str] | None = None, **overrides: Any
) -> dict[str, Any]:
    """BBH exact match (see the module docstring for the protocol).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        settings: the shared settings (:class:`~melora.experiments.instructeval.fewshot.EvalSettings`);
            here ``n_shots`` (3) are taken from the start of each task, ``max_examples``
            applies per task and ``max_new_tokens`` defaults to 32 (instruct-eval's).
        tasks: task names; default all 27.
        **overrides: any settings field, e.g. ``max_examples=20``.

    Returns:
        A result dict (:mod:`melora.experiments.instructeval.results`), headline ``exact_match``
        (macro over tasks).
    """
    s = EvalSettings.resolve(settings, overrides, n_shots=3, max_new_tokens=32)
    run = Evaluation("bbh", s, scope="per_subtask")
    data = load_bbh(s.data_dir, tasks)
    for task, examples in data.items():
        shots = examples[: s.n_shots]
        pool = list(enumerate(examples))[s.n_shots :]
        for index, example in subsample(pool, s.max_examples, s.seed, task):
            fitted = s.fit(tokenizer, lambda k, sh=shots, ex=example: build_bbh_prompt(sh[:k], ex), len(shots))
            run.add(fitted, task=task, index=index, example=example)

    generations = generate_batch(model, tokenizer, run.prompts, **s.generate_args())
    for it, gen in zip(run.items, generations, strict=True):
        target = it["example"]["target"]
        em = bbh_exact_match(gen, target)
        run.score(
            it["task"], {"exact_match": em, "prefix_match": bbh_prefix_match(gen, target)},
            task=it["task"], index=it["index"], generation=gen, prediction=extract_bbh_answer(gen), target=target,
            correct=em, n_shots=it["fitted"].n_shots,
        )
    per_subtask = run.per_subtask("exact_match", "prefix_match")
    return run.result(
        "exact_match",
        {
            "exact_match": mean(v["exact_match"] for v in per_subtask.values()),
            "prefix_match": mean(v["prefix_match"] for v in per_subtask.values()),
            "micro_exact_match": run.micro("exact_match"),
        },
        per_subtask,
        data_source=describe_source("bbh", BBH_HUB, s.data_dir),
    )
