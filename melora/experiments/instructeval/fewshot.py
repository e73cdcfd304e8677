"""The settings and the flow every benchmark shares, and fitting few-shot prompts into the context.

:class:`EvalSettings` holds what all benchmarks take (data root, subsampling,
batching, context and generation lengths, shot count); :class:`Evaluation`
runs one benchmark's common flow: fitted prompts in, per-example scores and
predictions collected by subtask, and the result dict out. Each benchmark keeps
only its own data loading, prompt building and scoring.

As in instruct-eval, shots are dropped one at a time from the end of the shot
list until the prompt fits. Here "fits" means prompt tokens (special tokens
included) plus ``max_new_tokens`` is at most ``max_length``, so the answer
always has room. A prompt that does not fit even with zero shots is kept
(counted as ``truncated``); generation then cuts it from the left.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from melora.experiments.instructeval.generation import count_tokens
from melora.experiments.instructeval.results import make_result, mean


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt with the number of shots it kept.

    Attributes:
        text: the prompt.
        n_shots: shots kept (0..requested).
        fits: whether ``tokens + max_new_tokens <= max_length``.
    """

    text: str
    n_shots: int
    fits: bool


def fit_shots(
    tokenizer,
    build_prompt: Callable[[int], str],
    n_shots: int,
    max_length: int | None,
    max_new_tokens: int,
) -> FittedPrompt:
    """Largest ``k <= n_shots`` whose prompt fits the context window.

    Args:
        tokenizer: used to count tokens.
        build_prompt: ``k -> prompt`` with the first ``k`` shots.
        n_shots: shots requested.
        max_length: context window (prompt + generation); ``None`` = unlimited.
        max_new_tokens: tokens reserved for the answer.

    Returns:
        The fitted prompt; with zero shots and still too long, ``fits`` is False.
    """
    k = n_shots
    while True:
        prompt = build_prompt(k)
        if max_length is None or count_tokens(tokenizer, prompt) + max_new_tokens <= max_length:
            return FittedPrompt(prompt, k, True)
        if k == 0:
            return FittedPrompt(prompt, 0, False)
        k -= 1


def summarize_shots(requested: int, used: Sequence[int]) -> dict:
    """Shot statistics for result dicts.

    Returns:
        ``{"requested", "mean", "min", "max", "n_reduced"}``; ``n_reduced`` counts
        prompts that kept fewer shots than requested.
    """
    if not used:
        return {"requested": requested, "mean": None, "min": None, "max": None, "n_reduced": 0}
    return {
        "requested": requested,
        "mean": sum(used) / len(used),
        "min": min(used),
        "max": max(used),
        "n_reduced": sum(u < requested for u in used),
    }


def fewshot_fields(requested: int, items: Sequence[dict]) -> dict:
    """The ``shots`` and ``n_truncated`` fields of a result, from the fitted prompts of ``items``."""
    return {
        "shots": summarize_shots(requested, [it["fitted"].n_shots for it in items]),
        "n_truncated": sum(not it["fitted"].fits for it in items),
    }


def input_budget(max_length: int | None, max_new_tokens: int) -> int | None:
    """Tokens left for the prompt: ``max_length - max_new_tokens`` (at least 1)."""
    return None if max_length is None else max(1, max_length - max_new_tokens)


@dataclass(frozen=True)
class EvalSettings:
    """The settings every benchmark takes; each ``evaluate_*`` also accepts them as keywords.

    Attributes:
        data_dir: local data root (else ``$MELORA_DATA_DIR``, else the hub).
        max_examples: evaluated examples, per subtask or in total (each benchmark's
            ``max_examples_scope``), subsampled with ``seed``.
        seed: subsampling (and, for DROP, shot-drawing) seed.
        batch_size: prompts per forward pass.
        max_length: context window, prompt plus generated tokens; ``None`` = unlimited.
        max_new_tokens: generated tokens, also reserved when fitting shots;
            ``None`` = the benchmark's default.
        n_shots: shots requested per prompt; ``None`` = the benchmark's default.
        return_predictions: add per-example predictions to the result.
    """

    data_dir: str | os.PathLike[str] | None = None
    max_examples: int | None = None
    seed: int = 0
    batch_size: int = 8
    max_length: int | None = 2048
    max_new_tokens: int | None = None
    n_shots: int | None = None
    return_predictions: bool = False

    @classmethod
    def resolve(
        cls, settings: EvalSettings | None, overrides: Mapping[str, Any], *, n_shots: int, max_new_tokens: int
    ) -> EvalSettings:
        """``settings`` (or the defaults) with ``overrides`` laid over them and a benchmark's defaults filling the gaps.

        Raises:
            TypeError: an override that is not a field.
        """
        s = dataclasses.replace(settings or cls(), **overrides)
        return dataclasses.replace(
            s,
            n_shots=n_shots if s.n_shots is None else s.n_shots,
            max_new_tokens=max_new_tokens if s.max_new_tokens is None else s.max_new_tokens,
        )

    @property
    def input_budget(self) -> int | None:
        """Tokens left for a prompt (:func:`input_budget`)."""
        return input_budget(self.max_length, self.max_new_tokens)

    def generate_args(self) -> dict[str, Any]:
        """Keyword arguments of :func:`melora.experiments.instructeval.generation.generate_batch`."""
        return {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "max_input_tokens": self.input_budget}

    def fit(self, tokenizer, build_prompt: Callable[[int], str], n_shots: int) -> FittedPrompt:
        """:func:`fit_shots` within this context window and generation budget."""
        return fit_shots(tokenizer, build_prompt, n_shots, self.max_length, self.max_new_tokens)


class Evaluation:
    """One benchmark run: its prompts, per-example scores by subtask, predictions, and the result dict.

    Args:
        task: the benchmark's name (the result's ``task``).
        settings: resolved settings (:meth:`EvalSettings.resolve`).
        scope: ``"per_subtask"`` or ``"total"`` (how ``max_examples`` applies).
        groups: subtask names in report order; others are added as they are scored.
    """

    def __init__(self, task: str, settings: EvalSettings, *, scope: str, groups: Iterable[str] = ()):
        self.task, self.settings, self.scope = task, settings, scope
        self.start = time.perf_counter()
        self.items: list[dict[str, Any]] = []
        self.scores: dict[str, list[dict[str, float]]] = {g: [] for g in groups}
        self.predictions: list[dict[str, Any]] = []

    def add(self, fitted: FittedPrompt, **fields: Any) -> None:
        """Adds an example with its prompt; ``fields`` stay with it (``item[...]``)."""
        self.items.append({**fields, "fitted": fitted})

    @property
    def prompts(self) -> list[str]:
        """The prompts, in the order they were added."""
        return [it["fitted"].text for it in self.items]

    def score(self, group: str, values: Mapping[str, float], **prediction: Any) -> None:
        """Records one example's metric values under a subtask, and its prediction."""
        self.scores.setdefault(group, []).append(dict(values))
        self.predictions.append(prediction)

    def per_subtask(self, *metrics: str) -> dict[str, dict[str, Any]]:
        """``{subtask: {metric: mean, ..., "n": count}}`` for the subtasks with examples."""
        return {
            g: {**{m: mean(r[m] for r in rows) for m in metrics}, "n": len(rows)}
            for g, rows in self.scores.items()
            if rows
        }

    def micro(self, metric: str) -> float | None:
        """Mean of ``metric`` over every scored example."""
        return mean(r[metric] for rows in self.scores.values() for r in rows)

    def result(
        self,
        metric: str,
        metrics: dict[str, float | None],
        per_subtask: dict[str, dict[str, Any]],
        *,
        data_source: str,
        stop: Sequence[str] | None = None,
        **generation: Any,
    ) -> dict[str, Any]:
        """The result dict (:mod:`melora.experiments.instructeval.results`); ``generation`` adds benchmark-specific settings."""
        s = self.settings
        return make_result(
            task=self.task, metric=metric, metrics=metrics, per_subtask=per_subtask,
            n_examples=len(self.items), **fewshot_fields(s.n_shots, self.items),
            generation={
                "max_new_tokens": s.max_new_tokens, "max_length": s.max_length, "batch_size": s.batch_size,
                "stop": stop, **generation,
            },
            max_examples=s.max_examples, max_examples_scope=self.scope, seed=s.seed, data_source=data_source,
            time_s=time.perf_counter() - self.start,
            predictions=self.predictions if s.return_predictions else None,
        )
