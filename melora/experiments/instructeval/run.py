"""INSTRUCTEVAL of a base model or a trained adapter (paper Table 3): ``python -m melora.experiments.instructeval``.

``evaluate_instruct(cfg)`` loads ``cfg.model`` (plus the adapter in
``cfg.adapter_dir``, merged into the weights by default), runs the benchmarks
of ``cfg.eval.tasks`` with :func:`melora.experiments.instructeval.evaluate_all` (MMLU 5-shot, BBH
3-shot, DROP 3-shot F1, HumanEval 0-shot pass@1, greedy decoding) and writes
``eval_record.json`` in its run folder::

    .hydra/config.yaml          resolved config (Hydra)
    config.yaml                 the same, next to the record
    eval_record.json            scores, metrics per task and sub-task, examples, shots,
                                generation settings, timing, model, adapter, config
    predictions/<task>.json     per-example outputs (with eval.save_predictions=true)

The record is rewritten after every benchmark, so an interrupted evaluation
resumes at the first unfinished benchmark; a finished one is skipped. A run is
identified by its resolved config and the adapter file's SHA-256: rerunning
into a folder that holds another evaluation is an error. ``main`` is the Hydra
entry point (root config ``configs/instructeval.yaml``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from melora.experiments.runs import EVAL_RECORD, config_hash, device_info, git_commit, package_versions
from melora.experiments.scaffold import check_number, entry_point, resolved
from melora.experiments.train.runlock import exclusive_run
from melora.files import atomic_write_json, atomic_write_text, file_sha256

log = logging.getLogger(__name__)



def resolve_adapter_dir(adapter_dir: str | Path | None) -> Path | None:
    """The folder holding ``adapter_config.json``: ``adapter_dir`` itself or its ``adapter/``.

    A training run folder (``runs/.../seed0``) may be given for its best
    adapter (``runs/.../seed0/adapter``).

    Raises:
        FileNotFoundError: neither folder holds an adapter.
    """
    if adapter_dir is None:
        return None
    path = Path(adapter_dir)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no adapter in {path} (looked for adapter_config.json there and in {path / 'adapter'}); "
        "give a folder written by melora.save_adapter or a training run folder"
    )


def eval_name(adapter_dir: str | None) -> str:
    """Folder name of an evaluation: ``base``, or ``<method_tag>-seed<k>`` for a run's adapter.

    ``runs/mini/instruct-alpaca/smollm2-135m/lora_r8/seed0[/adapter]`` →
    ``lora_r8-seed0``; any other folder → its name.
    """
    if adapter_dir in (None, "", "None", "null"):
        return "base"
    path = Path(str(adapter_dir).rstrip("/"))
    if path.name == "adapter":
        path = path.parent
    if path.name.startswith("seed") and path.parent.name:
        return f"{path.parent.name}-{path.name}"
    return path.name


# Used by configs/instructeval.yaml for the run folder's name.
OmegaConf.register_new_resolver("melora_eval_name", eval_name, replace=True)


def adapter_info(adapter: Path, model_name: str) -> dict[str, Any]:
    """What the record says about the adapter: method, config, hash, training run.

    Raises:
        ValueError: the adapter's training record names another model than ``model_name``.
    """
    from melora.adapters.io import WEIGHTS_FILE, read_adapter_config
    from melora.experiments.runs import read_record

    meta = read_adapter_config(adapter)
    info: dict[str, Any] = {
        "dir": str(adapter),
        "method": meta["method"],
        "config": meta["config"],
        "base_model": meta.get("base_model"),
        "sha256": file_sha256(adapter / WEIGHTS_FILE),
    }
    training = read_record(adapter.parent)
    if training is not None:
        trained_on = training.get("model")
        if trained_on is not None and trained_on != model_name:
            raise ValueError(f"the adapter in {adapter} was trained on model={trained_on}, this evaluation loads model={model_name}; pass model={trained_on}")
        keys = ("name", "profile", "method_tag", "seed", "status", "best_metric", "best_step", "metric", "trainable_params", "equivalent_rank", "global_step")
        info["training"] = {k: training.get(k) for k in keys}
    return info


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def task_settings(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Keyword arguments per benchmark for :func:`melora.experiments.instructeval.evaluate_all`.

    ``eval.max_examples`` is ``null`` (everything), an int (every benchmark)
    or a ``{task: int | null}`` map; the profile's ``eval.profile_task_kwargs``
    and then the user's ``eval.task_kwargs`` are laid over it.
    """
    ev = cfg.eval
    caps = _plain(ev.max_examples)
    layers = [_plain(ev.get(k)) or {} for k in ("profile_task_kwargs", "task_kwargs")]
    named = sorted({t for layer in layers for t in layer} | (set(caps) if isinstance(caps, Mapping) else set()))
    from melora.experiments.instructeval import TASKS

    bad = [t for t in named if t not in TASKS]
    if bad:
        raise ValueError(f"eval settings name unknown benchmark(s) {bad}; choose from {list(TASKS)}")
    out = {}
    for task in ev.tasks:
        kwargs: dict[str, Any] = {"max_examples": caps.get(task) if isinstance(caps, Mapping) else caps}
        for layer in layers:
            kwargs.update(layer.get(task) or {})
        out[task] = kwargs
    return out


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def load_eval_model(cfg: DictConfig, adapter: Path | None):
    """``(model, tokenizer, merged)``: the base model, with the adapter loaded (and merged) if given."""
    from melora.adapters.inject import merge_and_unload
    from melora.adapters.io import load_adapter
    from melora.experiments.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model)
    merged = False
    if adapter is not None:
        model = load_adapter(model, adapter)
        if cfg.eval.merge:
            # After merging, inference costs exactly the base model.
            model = merge_and_unload(model)
            merged = True
    model.config.use_cache = True
    model.to(pick_device(cfg.eval.device)).eval()
    return model, tokenizer, merged


def read_eval_record(run_dir: Path) -> dict | None:
    """The folder's evaluation record; a damaged one is moved aside (``.damaged``) with a warning and counts as none."""
    from melora.experiments.runs import move_aside, read_json_object

    path = run_dir / EVAL_RECORD
    if not path.is_file():
        return None
    try:
        return read_json_object(path)
    except ValueError as err:
        moved = move_aside(path)
        log.warning("%s is damaged (%s); moved aside to %s, evaluating again", path, err, moved.name if moved else "?")
        return None


@exclusive_run  # one process per run folder: another one skips it
def evaluate_instruct(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.model`` (+ ``cfg.adapter_dir``) on ``cfg.eval.tasks``; returns the eval record."""
    from melora.experiments.instructeval import evaluate_all
    from melora.experiments.instructeval.results import mean

    run_dir = Path(cfg.run_dir)
    config = resolved(cfg)
    adapter = resolve_adapter_dir(cfg.adapter_dir)
    info = adapter_info(adapter, cfg.model.name) if adapter is not None else None
    identity = config_hash({**config, "adapter_sha256": info["sha256"] if info else None})
    settings = task_settings(cfg)

    existing = read_eval_record(run_dir)
    if existing is not None and existing.get("config_hash") != identity:
        raise ValueError(
            f"{run_dir} holds another evaluation (hash {existing.get('config_hash')} vs {identity}: a different "
            "config or adapter); remove it or choose another folder with hydra.run.dir=… or eval_name=…"
        )
    if existing is not None and existing.get("status") == "completed":
        log.info("%s is already complete (average %s); skipping", run_dir, existing.get("average"))
        return existing
    done = dict(existing.get("results", {})) if existing is not None and cfg.resume else {}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    started = time.time()
    cpu_start = time.process_time()
    set_seed(cfg.eval.seed)
    t0 = time.perf_counter()
    model, tokenizer, merged = load_eval_model(cfg, adapter)
    load_s = time.perf_counter() - t0
    record: dict[str, Any] = {
        "name": f"{cfg.model.name}/{cfg.eval_name}",
        "kind": "instructeval",
        "status": "running",
        "profile": cfg.profile.name,
        "model": cfg.model.name,
        "model_name_or_path": cfg.model.name_or_path,
        "model_dtype": cfg.model.dtype,
        "adapter": info,
        "merged": merged,
        "tasks": list(cfg.eval.tasks),
        "task_settings": settings,
        "seed": cfg.eval.seed,
        "batch_size": cfg.eval.batch_size,
        "max_length": cfg.eval.max_length,
        "config": config,
        "config_hash": identity,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "device": {**device_info(), "eval_device": str(pick_device(cfg.eval.device))},
        "started_at": started,
        "load_time_s": load_s,
    }

    def summarise(results: dict) -> dict:
        scores = {t: r["score"] for t, r in results.items()}
        return {
            "results": results,
            "scores": scores,
            "average": mean(s for s in scores.values() if s is not None),
            "n_examples": {t: r["n_examples"] for t, r in results.items()},
            "shots": {t: r["shots"] for t, r in results.items()},
            "generation": {t: r["generation"] for t, r in results.items()},
            "time_s": {t: r["time_s"] for t, r in results.items()},
            "cpu_time_s": {t: r.get("cpu_time_s") for t, r in results.items()},
        }

    results = {t: done[t] for t in cfg.eval.tasks if t in done}
    for task in cfg.eval.tasks:
        if task in results:
            log.info("%s: already evaluated (%s = %s)", task, results[task]["metric"], results[task]["score"])
            continue
        kwargs = dict(settings[task])
        cpu0 = time.process_time()
        out = evaluate_all(
            model, tokenizer, tasks=[task], data_dir=cfg.data_dir, max_examples=kwargs.pop("max_examples"),
            seed=cfg.eval.seed, batch_size=cfg.eval.batch_size, max_length=cfg.eval.max_length,
            task_kwargs={task: kwargs} if kwargs else None, return_predictions=cfg.eval.save_predictions,
        )
        result = out["results"][task]
        # CPU seconds of all threads: comparable across runs on a shared, busy machine, unlike wall time.
        result["cpu_time_s"] = time.process_time() - cpu0
        predictions = result.pop("predictions", None)
        if predictions is not None:
            atomic_write_json(run_dir / "predictions" / f"{task}.json", predictions)
        results[task] = result
        log.info("%s: %s = %.4f on %d examples (%.0f s)", task, result["metric"], result["score"] or 0.0, result["n_examples"], result["time_s"])
        record.update(summarise(results))
        atomic_write_json(run_dir / EVAL_RECORD, record)
    record.update(summarise(results), status="completed", finished_at=time.time(), wall_time_s=time.time() - started,
                  process_cpu_time_s=time.process_time() - cpu_start)
    atomic_write_json(run_dir / EVAL_RECORD, record)
    return record


def check_eval_config(cfg: DictConfig) -> None:
    """INSTRUCTEVAL's settings: benchmarks, batch, length, device, and an adapter that can be read.

    Raises:
        ValueError: the first setting no evaluation can use, in one line with the fix.
    """
    from melora.experiments.instructeval import TASKS

    unknown = [t for t in cfg.eval.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"eval.tasks names unknown benchmark(s) {', '.join(map(str, unknown))}; choose from {', '.join(TASKS)}, "
                         "e.g. eval.tasks=[mmlu,drop]")
    check_number(cfg, "eval.batch_size", 1, example="eval.batch_size=8")
    check_number(cfg, "eval.max_length", 1, example="eval.max_length=2048")
    device = str(cfg.eval.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"eval.device={device}: this machine has no CUDA device; use eval.device=auto or eval.device=cpu")
    if cfg.get("adapter_dir") not in (None, "", "None", "null"):
        from melora.adapters.io import read_adapter_config
        from melora.experiments.train.checkpoint import damaged_adapter

        directory = resolve_adapter_dir(cfg.adapter_dir)
        read_adapter_config(directory)  # a folder of another format says so first
        damage = damaged_adapter(directory)
        if damage is not None:
            raise ValueError(f"{damage}; the adapter cannot be evaluated: train it again or restore the file")


main = entry_point("instructeval", evaluate_instruct, result="average", check=check_eval_config)

if __name__ == "__main__":
    main()
