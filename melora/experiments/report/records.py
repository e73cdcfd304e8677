"""Reading run records and the facts tables need from them.

A GLUE record (``melora.experiments.glue``) holds the task, the method config, the best dev
metric and provenance. An instruction-tuning training record (``melora.experiments.instruct``)
holds the dev loss as its main metric; its benchmark scores are in an
``eval_record.json`` written by ``melora.experiments.instructeval``, either in its own folder
(``<runs>/<profile>/instructeval/<model>/<tag>-seed<k>/``, linked to the training
run by ``adapter.training``) or in the training run's folder. ``load_records``
attaches the completed evaluation to its training record as ``record["eval"]``.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from melora.adapters import AdapterConfig, MELoRAConfig, config_from_dict
from melora.experiments.runs import EVAL_RECORD, iter_records, read_json_object

log = logging.getLogger(__name__)
BASE_TAG = "base"  # method_tag of a base model's evaluation (no adapter)


def load_records(root: str | Path, eval_file: str = EVAL_RECORD) -> list[dict]:
    """Every ``record.json`` below ``root`` (``run_dir`` set); instruct runs get ``eval`` when evaluated."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no runs folder {root}: train some runs first (python -m melora.experiments.sweep <spec> --profile …)")
    records = list(iter_records(root))
    attach_evaluations(records, root, eval_file)
    return records


def selection_of(record: dict) -> str:
    """Where a run chose its best epoch: ``"heldout"`` (held-out training split) or ``"dev"``.

    Records written before held-out selection existed selected on dev.
    """
    return (record.get("selection") or {}).get("split", "dev")


def attach_evaluations(records: list[dict], root: Path, eval_file: str = EVAL_RECORD) -> None:
    """Set ``record["eval"]`` of each instruct training record to its latest completed evaluation.

    An unfinished evaluation is not used; the record gets ``eval_note`` saying where it is.
    A completed evaluation of a base model (no adapter) is appended to ``records``
    as a ``base_model_record``: the reference row of Tables 3 and 5.
    """
    instruct = [r for r in records if r.get("kind") == "instruct"]
    by_dir = {Path(r["run_dir"]).resolve(): r for r in instruct}
    by_run = {(r.get("profile"), r.get("model"), r.get("method_tag"), r.get("seed")): r for r in instruct}
    bases: dict[tuple, dict] = {}
    for path in sorted(root.rglob(eval_file)):
        try:
            evaluation = read_json_object(path)
        except ValueError as err:  # a damaged evaluation is listed, not fatal: rerunning it rewrites the file
            log.warning("%s is damaged (%s); its evaluation is left out until it is run again", path, err)
            continue
        if evaluation.get("kind") == "instructeval" and evaluation.get("adapter") is None:
            key = (evaluation.get("profile"), evaluation.get("model"))
            if evaluation.get("status") == "completed" and evaluation.get("finished_at", 0) >= bases.get(key, {}).get("finished_at", 0):
                bases[key] = evaluation | {"run_dir": str(path.parent)}
            continue
        training = (evaluation.get("adapter") or {}).get("training") or {}
        target = by_dir.get(path.parent.resolve()) or by_run.get(
            (training.get("profile"), evaluation.get("model"), training.get("method_tag"), training.get("seed")))
        if target is None:
            continue
        evaluation["run_dir"] = str(path.parent)
        if evaluation.get("status", "completed") != "completed":
            target.setdefault("eval_note", f"evaluation {evaluation.get('status')} in {path.parent}")
            continue
        previous = target.get("eval")
        if previous is None or evaluation.get("finished_at", 0) >= previous.get("finished_at", 0):
            target["eval"] = evaluation
    records.extend(base_model_record(evaluation, instruct) for evaluation in bases.values())


def base_model_record(evaluation: dict, training_records: list[dict]) -> dict:
    """A record for the base model without adapter, shaped like an instruct training record.

    Its benchmark scores are ``evaluation``'s; its dev loss is the one every
    training run of the same profile and model measured before its first step
    (``dev_loss_at_start``: ``B = 0``, so the model is the base model). Zero
    trainable parameters, no seed.
    """
    profile, model = evaluation.get("profile"), evaluation.get("model")
    start = [r["dev_loss_at_start"] for r in training_records
             if (r.get("profile"), r.get("model")) == (profile, model) and r.get("dev_loss_at_start") is not None]
    return {
        "name": f"{model}/{BASE_TAG}",
        "kind": "instruct",
        "status": "completed",
        "profile": profile,
        "model": model,
        "model_name_or_path": evaluation.get("model_name_or_path"),
        "method_tag": BASE_TAG,
        "method_config": {"method": BASE_TAG},
        "seed": None,
        "adapter_params": 0,
        "best_metric": statistics.median(start) if start else None,
        "eval": evaluation,
        "run_dir": evaluation["run_dir"],
        "device": evaluation.get("device"),
        "started_at": evaluation.get("started_at"),
    }


def method_config_of(record: dict) -> AdapterConfig | None:
    """The run's adapter config, rebuilt from its record (``None`` for a base model or a record without one)."""
    cfg = record.get("method_config")
    if not cfg or cfg.get("method") == BASE_TAG:
        return None
    return config_from_dict(cfg)


def label_of(record: dict) -> str | None:
    """The setting a run belongs to, from its method config: ``"MELoRA n=8 r=1"``, ``"LoRA r=8"``, ``"base"``.

    Tables and figures group runs by it; the ``method_tag`` is only a folder name.
    """
    if (record.get("method_config") or {}).get("method") == BASE_TAG:
        return BASE_TAG
    config = method_config_of(record)
    return None if config is None else config.label()


@dataclass(frozen=True)
class Setting:
    """An adapter setting: method, number of mini adapters ``n`` (1 but for MELoRA) and rank ``r`` of each."""

    method: str
    n: int
    r: int | None


def setting_of(record: dict) -> Setting:
    """The run's ``Setting``, asked of its method config (``blocks``, ``rank``); a base model is ``("base", 1, None)``."""
    config = method_config_of(record)
    if config is None:
        return Setting(method=(record.get("method_config") or {}).get("method", BASE_TAG), n=1, r=None)
    return Setting(method=config.method, n=config.blocks, r=config.rank)


def lora_family(record: dict) -> tuple[int, int] | None:
    """``(n, r)`` of a LoRA (n = 1) or MELoRA run at the default scaling (``per_mini``); ``None`` otherwise.

    Figures 4 and 5 are about MELoRA's own two knobs, so they take MELoRA's configs only.
    """
    config = method_config_of(record)
    if not isinstance(config, MELoRAConfig) or config.scaling != "per_mini":
        return None
    return config.n, config.r


def completed(record: dict) -> bool:
    return record.get("status") == "completed"


def lookup(obj, path: str):
    """``lookup(d, "scores.mmlu")`` → ``d["scores"]["mmlu"]``; ``None`` if any step is missing."""
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def run_name(record: dict) -> str:
    return record.get("name") or record.get("run_dir", "?")


def hardware(record: dict) -> str:
    device = record.get("device") or {}
    if device.get("cuda"):
        names = device["cuda"]
        return f"{len(names)}× {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    cpu = device.get("cpu") or "CPU"
    return f"{cpu} ({device.get('cpu_count', '?')} cores, {device.get('torch_threads', '?')} torch threads)"


def run_date(record: dict) -> str | None:
    started = record.get("started_at")
    return dt.datetime.fromtimestamp(started, dt.timezone.utc).date().isoformat() if started else None


def single_value(records: list[dict], field: str, what: str, choice: str | None = None) -> str:
    """The one ``field`` value the records share (``choice`` picks one when they differ).

    Raises:
        ValueError: the records hold several values and no ``choice``, or not ``choice``.
    """
    values = sorted({r.get(field) for r in records if r.get(field) is not None})
    if choice is not None:
        if choice not in values:
            raise ValueError(f"no {what} '{choice}' among the records; they hold {values}")
        return choice
    if len(values) != 1:
        raise ValueError(f"the records hold {len(values)} {what}s {values}: choose one (--{what} …)")
    return values[0]


def scope(records: list[dict], kind: str, model: str | None = None, profile: str | None = None) -> tuple[list[dict], str | None, str | None]:
    """The records of one kind, profile and model: ``(records, model, profile)``.

    A table mixes neither profiles nor models; when the records hold several,
    ``model``/``profile`` must say which (``single_value`` raises otherwise).
    """
    records = [r for r in records if r.get("kind") == kind]
    if not records:
        return [], model, profile
    profile = single_value(records, "profile", "profile", profile)
    records = [r for r in records if r.get("profile") == profile]
    model = single_value(records, "model", "model", model)
    return [r for r in records if r.get("model") == model], model, profile
