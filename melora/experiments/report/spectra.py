"""Figure 3's statistic from saved adapters: singular values of ``ΔW`` per adapted layer.

A run's best adapter (``<run_dir>/adapter``) is loaded into a fresh base model
built from the run's own config, and ``melora.analysis.singular_values`` does
the SVD (fp64, scaling included). A folder exported without weights
(``melora.experiments.report.export``) holds the singular values instead, in ``spectra.json``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

from melora.analysis import LayerSpectrum

BaseModelFactory = Callable[[dict], "object"]
SPECTRA_FILE = "spectra.json"


def glue_base_model(record: dict):
    """The pretrained classifier a GLUE run started from (the head is the adapter's ``modules_to_save``)."""
    from melora.experiments.data.glue_tasks import get_task
    from melora.experiments.models import load_sequence_classifier

    task = get_task(record["task"])
    problem = "regression" if task.is_regression else "single_label_classification"
    return load_sequence_classifier(record["config"]["model"], task.num_labels, problem)


def has_adapter(record: dict) -> bool:
    return (Path(record["run_dir"]) / "adapter").is_dir()


def has_spectra(record: dict) -> bool:
    """Whether ``run_spectra`` can answer: a saved adapter, or an exported ``spectra.json``."""
    return has_adapter(record) or (Path(record["run_dir"]) / SPECTRA_FILE).is_file()


def spectra_from_file(path: Path, threshold: float) -> dict[str, LayerSpectrum]:
    import torch

    layers = json.loads(Path(path).read_text())["layers"]
    out = {}
    for name, entry in layers.items():
        values = torch.tensor(entry["singular_values"], dtype=torch.float64)
        out[name] = LayerSpectrum(name, values, threshold, int((values > threshold).sum()), entry.get("nominal_rank"))
    return out


def run_spectra(record: dict, threshold: float = 0.1, base_model: BaseModelFactory | None = None) -> dict[str, LayerSpectrum]:
    """Layer path → ``LayerSpectrum`` of the run's best adapter.

    Args:
        record: A run record (``run_dir`` set, as ``load_records`` does).
        threshold: Singular values strictly above it are counted.
        base_model: ``record → fresh base model``; default: ``glue_base_model``.
    """
    import torch

    from melora import load_adapter
    from melora.analysis import singular_values

    adapter = Path(record["run_dir"]) / "adapter"
    if not adapter.is_dir():
        exported = Path(record["run_dir"]) / SPECTRA_FILE
        if exported.is_file():
            return spectra_from_file(exported, threshold)
        raise FileNotFoundError(f"{record['run_dir']} has no adapter/ folder (the run saves its best adapter there) and no {SPECTRA_FILE}")
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # One base model per run: its load report (the fresh classifier head is expected) and bar are noise here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        base = (base_model or glue_base_model)(record)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model = load_adapter(base, adapter)
    # SVDs of attention-sized matrices gain nothing from threads, and on shared cores
    # OpenMP's spin-waiting makes them ~100x slower (seconds per 384x384 matrix).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return singular_values(model, threshold=threshold)
    finally:
        torch.set_num_threads(threads)


def layer_position(name: str) -> tuple[str, int]:
    """``"bert.encoder.layer.3.attention.self.query"`` → ``("query", 3)``: projection kind, block index."""
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    return name.rsplit(".", 1)[-1], int(numbers[-1]) if numbers else 0


def mean_counts(spectra: list[dict[str, LayerSpectrum]], threshold: float = 0.1) -> dict[str, dict[int, float]]:
    """Projection kind → block index → singular values above ``threshold``, averaged over runs."""
    sums: dict[tuple[str, int], list[int]] = defaultdict(list)
    for run in spectra:
        for name, sp in run.items():
            sums[layer_position(name)].append(int((sp.singular_values > threshold).sum()))
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for (kind, index), counts in sorted(sums.items()):
        out[kind][index] = sum(counts) / len(counts)
    return dict(out)
