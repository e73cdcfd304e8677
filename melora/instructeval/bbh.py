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

import time
from collections.abc import Sequence
from typing import Any

from melora.instructeval.data import BBH_HUB, describe_source, load_bbh, subsample
from melora.instructeval.fewshot import fewshot_fields, fit_shots, input_budget
from melora.instructeval.generation import generate_batch
from melora.instructeval.results import make_result, mean


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
    model,
    tokenizer,
    *,
    data_dir: str | None = None,
    tasks: Sequence[str] | None = None,
    n_shots: int = 3,
    max_examples: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = 2048,
    max_new_tokens: int = 32,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """BBH exact match (see the module docstring for the protocol).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        data_dir: local data root (else ``$MELORA_DATA_DIR``, else the hub).
        tasks: task names; default all 27.
        n_shots: shots taken from the start of each task (3).
        max_examples: evaluated examples per task, subsampled with ``seed``.
        seed: subsampling seed.
        batch_size: prompts per forward pass.
        max_length: context window, prompt plus generated tokens.
        max_new_tokens: generated tokens (instruct-eval: 32).
        return_predictions: add per-example predictions to the result.

    Returns:
        A result dict (:mod:`melora.instructeval.results`), headline ``exact_match``
        (macro over tasks).
    """
    start = time.perf_counter()
    data = load_bbh(data_dir, tasks)
    items: list[dict[str, Any]] = []
    for task, examples in data.items():
        shots = examples[:n_shots]
        pool = list(enumerate(examples))[n_shots:]
        for index, example in subsample(pool, max_examples, seed, task):
            fitted = fit_shots(
                tokenizer,
                lambda k, sh=shots, ex=example: build_bbh_prompt(sh[:k], ex),
                len(shots), max_length, max_new_tokens,
            )
            items.append({"task": task, "index": index, "example": example, "fitted": fitted})

    generations = generate_batch(
        model, tokenizer, [it["fitted"].text for it in items], max_new_tokens, batch_size,
        max_input_tokens=input_budget(max_length, max_new_tokens),
    )
    per_task: dict[str, dict[str, list[bool]]] = {t: {"em": [], "prefix": []} for t in data}
    predictions = []
    for it, gen in zip(items, generations, strict=True):
        target = it["example"]["target"]
        em, prefix = bbh_exact_match(gen, target), bbh_prefix_match(gen, target)
        per_task[it["task"]]["em"].append(em)
        per_task[it["task"]]["prefix"].append(prefix)
        predictions.append(
            {
                "task": it["task"], "index": it["index"], "generation": gen,
                "prediction": extract_bbh_answer(gen), "target": target, "correct": em,
                "n_shots": it["fitted"].n_shots,
            }
        )
    per_subtask = {
        t: {"exact_match": mean(v["em"]), "prefix_match": mean(v["prefix"]), "n": len(v["em"])}
        for t, v in per_task.items()
        if v["em"]
    }
    all_em = [e for v in per_task.values() for e in v["em"]]
    return make_result(
        task="bbh",
        metric="exact_match",
        metrics={
            "exact_match": mean(v["exact_match"] for v in per_subtask.values()),
            "prefix_match": mean(v["prefix_match"] for v in per_subtask.values()),
            "micro_exact_match": mean(all_em),
        },
        per_subtask=per_subtask,
        n_examples=len(all_em),
        **fewshot_fields(n_shots, items),
        generation={
            "max_new_tokens": max_new_tokens, "max_length": max_length,
            "batch_size": batch_size, "stop": None,
        },
        max_examples=max_examples,
        max_examples_scope="per_subtask",
        seed=seed,
        data_source=describe_source("bbh", BBH_HUB, data_dir),
        time_s=time.perf_counter() - start,
        predictions=predictions if return_predictions else None,
    )
