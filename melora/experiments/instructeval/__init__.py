"""INSTRUCTEVAL harness for the MELoRA paper's Table 3: MMLU, BBH, DROP, HumanEval.

Follows declare-lab/instruct-eval (prompt formats, shot counts, shot selection,
generation lengths, scoring) for any Hugging Face causal LM and tokenizer::

    from melora.experiments.instructeval import evaluate_all
    out = evaluate_all(model, tokenizer, data_dir="/data", max_examples=20)
    print(out["scores"])   # {"mmlu": ..., "drop": ..., "humaneval": ..., "bbh": ...}

Data comes from ``data_dir``, else ``$MELORA_DATA_DIR``, else the hub
(:mod:`melora.experiments.instructeval.data`). HumanEval completions run in a sandboxed child
interpreter (:mod:`melora.experiments.instructeval.sandbox`).

``python -m melora.experiments.instructeval`` (:mod:`melora.experiments.instructeval.run`) evaluates a
training run's adapter or a base model and writes its ``eval_record.json``.

Modules: ``run`` (the Hydra entry point, :func:`evaluate_instruct`), ``data`` (loading, subsampling), ``generation`` (batched greedy
generation, log-likelihoods), ``fewshot`` (the settings every benchmark takes,
:class:`EvalSettings`, their shared flow, and fitting shots into the context),
``mmlu``, ``bbh``, ``drop``, ``humaneval`` (one benchmark each), ``sandbox``
(code execution), ``results`` (the result-dict schema), ``harness``
(:func:`evaluate_all`).
"""

from melora.experiments.instructeval.bbh import build_bbh_prompt, evaluate_bbh, extract_bbh_answer
from melora.experiments.instructeval.data import load_bbh, load_drop, load_humaneval, load_mmlu, resolve_data_dir, subsample
from melora.experiments.instructeval.drop import build_drop_prompt, drop_em_f1, drop_metrics, evaluate_drop
from melora.experiments.instructeval.fewshot import EvalSettings, fit_shots
from melora.experiments.instructeval.generation import generate_batch
from melora.experiments.instructeval.harness import TASKS, evaluate_all
from melora.experiments.instructeval.humaneval import build_humaneval_prompt, evaluate_humaneval, postprocess_completion, score_completions
from melora.experiments.instructeval.mmlu import build_mmlu_prompt, evaluate_mmlu, extract_choice
from melora.experiments.instructeval.run import evaluate_instruct  # noqa: I001 - after the benchmarks it runs
from melora.experiments.instructeval.sandbox import check_correctness, run_in_sandbox

__all__ = [
    "TASKS",
    "EvalSettings",
    "build_bbh_prompt",
    "build_drop_prompt",
    "build_humaneval_prompt",
    "build_mmlu_prompt",
    "check_correctness",
    "drop_em_f1",
    "drop_metrics",
    "evaluate_all",
    "evaluate_bbh",
    "evaluate_drop",
    "evaluate_humaneval",
    "evaluate_instruct",
    "evaluate_mmlu",
    "extract_bbh_answer",
    "extract_choice",
    "fit_shots",
    "generate_batch",
    "load_bbh",
    "load_drop",
    "load_humaneval",
    "load_mmlu",
    "postprocess_completion",
    "resolve_data_dir",
    "run_in_sandbox",
    "score_completions",
    "subsample",
]
