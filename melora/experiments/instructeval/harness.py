"""Running several INSTRUCTEVAL benchmarks in one call (MELoRA paper, Table 3)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from melora.experiments.instructeval.bbh import evaluate_bbh
from melora.experiments.instructeval.drop import evaluate_drop
from melora.experiments.instructeval.fewshot import EvalSettings
from melora.experiments.instructeval.humaneval import evaluate_humaneval
from melora.experiments.instructeval.mmlu import evaluate_mmlu
from melora.experiments.instructeval.results import mean

TASKS: tuple[str, ...] = ("mmlu", "drop", "humaneval", "bbh")

EVALUATORS: dict[str, Callable[..., dict[str, Any]]] = {
    "mmlu": evaluate_mmlu,
    "bbh": evaluate_bbh,
    "drop": evaluate_drop,
    "humaneval": evaluate_humaneval,
}


def evaluate_all(
    model,
    tokenizer,
    tasks: Sequence[str] = TASKS,
    data_dir: str | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = 2048,
    task_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Runs the selected benchmarks with shared settings.

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        tasks: any of ``"mmlu"``, ``"bbh"``, ``"drop"``, ``"humaneval"``.
        data_dir: local data root (else ``$MELORA_DATA_DIR``, else the hub).
        max_examples: per subject/task for MMLU and BBH, in total for DROP and
            HumanEval (each benchmark's ``max_examples``).
        seed: subsampling and shot-drawing seed.
        batch_size: prompts per forward pass.
        max_length: context window, prompt plus generated tokens.
        task_kwargs: extra keyword arguments per task, e.g.
            ``{"mmlu": {"subjects": [...], "scoring": "loglik"},
            "humaneval": {"max_new_tokens": 256}}``; they override the shared ones
            (any :class:`~melora.experiments.instructeval.fewshot.EvalSettings` field or a
            benchmark's own keyword).
        return_predictions: keep per-example predictions in each result.

    Returns:
        ``{"results": {task: result dict}, "scores": {task: headline score},
        "average": mean headline score, "time_s": float}``; see
        :mod:`melora.experiments.instructeval.results` for the result dicts.
    """
    unknown = sorted(set(tasks) - set(EVALUATORS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {sorted(EVALUATORS)}")
    task_kwargs = dict(task_kwargs or {})
    unused = sorted(set(task_kwargs) - set(tasks))
    if unused:
        raise ValueError(f"task_kwargs given for tasks not run: {unused}")
    start = time.perf_counter()
    settings = EvalSettings(
        data_dir=data_dir, max_examples=max_examples, seed=seed, batch_size=batch_size, max_length=max_length,
        return_predictions=return_predictions,
    )
    results = {task: EVALUATORS[task](model, tokenizer, settings, **task_kwargs.get(task, {})) for task in tasks}
    scores = {t: r["score"] for t, r in results.items()}
    return {
        "results": results,
        "scores": scores,
        "average": mean(s for s in scores.values() if s is not None),
        "time_s": time.perf_counter() - start,
    }
