"""Fitting few-shot prompts into the model's context, and summarising shot use.

As in instruct-eval, shots are dropped one at a time from the end of the shot
list until the prompt fits. Here "fits" means prompt tokens (special tokens
included) plus ``max_new_tokens`` is at most ``max_length``, so the answer
always has room. A prompt that does not fit even with zero shots is kept
(counted as ``truncated``); generation then cuts it from the left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from melora.instructeval.generation import count_tokens


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
