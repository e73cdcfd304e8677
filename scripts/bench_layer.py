"""Wall time of one adapted linear layer: MELoRA against LoRA baselines.

What is measured: a full square layer (frozen ``nn.Linear`` + adapter) applied
to ``T`` tokens, in two modes:

* ``fwd``: an inference forward under ``torch.no_grad()``;
* ``fwdbwd``: forward + ``backward(grad_out)`` with the input requiring grad,
  as inside a network (the frozen weight gets no gradient, the input and the
  adapter factors do); gradients are reset to ``None`` between calls, outside
  the timed region.

Variants, all sharing one frozen base layer per ``(d, T)``:

* ``base``: the frozen ``nn.Linear`` alone, the denominator of every ratio;
* ``melora``: MELoRA's PEFT tuner layer (``peft.get_peft_model`` with a
  ``melora.MELoRAConfig``, made exactly as PEFT LoRA's below), its formulation picked by
  the cost rule (the ``path`` column);
* ``melora_<path>`` for each of ``melora.adapters.formulations.FORMULATIONS`` (with ``--paths``):
  the same layer with ``layer.formulation`` forced, the measurements that calibrate
  the rule's constants (``melora/adapters/formulations.py``);
* ``peft_lora_nr`` / ``peft_lora_r``: PEFT's ``lora.Linear`` (built with
  ``peft.get_peft_model``) at the equivalent rank ``n·r`` / at rank ``r``
  (the same parameter count and FLOPs as MELoRA);
* ``mini_loop``: the official implementation's Python loop over ``n``
  separate ``nn.Linear`` pairs on ``torch.chunk``-ed input, each output
  scaled, ``torch.cat``-ed and added in place to the base output (what the
  authors' PEFT-0.5 fork does);
* ``block_diag``: the dense ``ΔW = blockdiag(B_i A_i)`` built every forward;
* ``melora_merged`` (``fwd`` only): ``MELoRALinear`` after ``.merge()``;
* ``merged_linear`` (``fwd`` only): the merged layer's own frozen ``nn.Linear``
  (``melora_merged.base_layer``, the merged weight) called alone, the
  denominator of target 3: the same weight memory, so the ratio is what the
  merged wrapper adds, not where its (copied) weight sits in the caches.

How: every module of one ``(device, dtype, d, T, mode)`` group is timed
round-robin, one call each per round, so load from other processes falls on
all variants alike; a module's ``ms`` is the median of its samples. Each module
first gets one warm-up call, whose time sets its repeat count (about
``--budget`` seconds of samples, clamped to a minimum and ``--max-reps``);
a job whose samples stay scattered (other processes' load) gets more, up to
``--max-reps`` or three budgets. Calls slower than ``HEAVY_CALL_S`` keep the
warm-up as a sample, because first-call costs are negligible next to them and
the full grid must fit in 10-20 minutes on 2 cores. The fastest sample
(``min_ms``) is kept too, and every target is also judged on it, as a check
of how much of a verdict is load noise. ``--clock cpu`` times process CPU
time on one thread instead: not the wall time asked for, but nearly immune to
other processes, for a loaded machine.

``--lockstep`` pairs the samples: after the warm-ups (none kept as a sample),
every module of a group gets the same number of samples, one per round (the
largest repeat count among them, no extra rounds for noisy jobs), so sample
``i`` of every module was taken in round ``i``; rounds run the modules a
target compares next to each other, in alternating direction. The paired statistic of a target's ratio A/B is the
median over rounds of ``A_i / B_i``: load that drifts over seconds falls on
both samples of a round and cancels, where a ratio of two medians keeps it.
Each paired median comes with a distribution-free 95 % interval (order
statistics of the per-round ratios, binomial with p = 1/2), and the targets
are judged on it as well (``paired_vs_*`` columns, the *paired* report lines).

``base``, ``melora_merged`` (merged at the largest ``n``, ``r``) and
``merged_linear`` are measured once per group, and each measurement is repeated
on every row it answers. PEFT LoRA is measured once per config, at rank ``n·r`` and at rank
``r`` (one module when ``n = 1``), so that each is timed next to the MELoRA layer it is
compared with (a PEFT module shared by the configs of one rank, n=16 r=8 and n=64 r=2,
could sit next to only one of them).

Outputs: ``<out>/layer.csv`` (one row per config, variant and mode; ``path``:
the formulation ``MELoRALinear``'s cost rule picked, on ``melora`` rows;
with ``--lockstep``, ``paired_vs_peft_nr``, ``paired_vs_loop``,
``paired_vs_peft_r`` on ``melora`` rows and ``paired_vs_merged_linear``,
``paired_vs_base`` on ``melora_merged`` rows, each with its interval ``_lo`` / ``_hi``, empty
otherwise) and ``<out>/layer.md`` (hardware, allocator, tables, and PASS/FAIL
per target).

Run as ``make bench-layer``; ``--quick`` is a 1-2 minute check.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import gc
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import melora
from melora import MELoRAConfig, MELoRALinear
from melora.adapters.formulations import FORMULATIONS
from melora.adapters.melora import Linear as MELoRATunerLinear

FULL_GRID = {"d": [768, 4096], "n": [1, 2, 4, 8, 16, 64], "r": [1, 2, 8], "tokens": [512, 4096]}  # the targets' grid
QUICK_GRID = {"d": [768], "n": [1, 4, 16, 64], "r": [1, 8], "tokens": [512]}
SEQ_LEN = 512  # tokens are laid out as (T / SEQ_LEN, SEQ_LEN, d) batches, as in a network
ALPHA = 16.0
HEAVY_CALL_S = 0.25
# Under load from other processes, keep sampling a noisy job (IQR above this % of
# its median) up to --max-reps or NOISY_BUDGET_FACTOR × --budget of samples.
NOISY_SPREAD_PCT = 15.0
NOISY_BUDGET_FACTOR = 3.0
MIN_REPS = {"base": 5, "block_diag": 1}  # block_diag is a reference, never a target
DEFAULT_MIN_REPS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MELORA_PATH_VARIANTS = [f"melora_{path}" for path in FORMULATIONS]  # with --paths
VARIANT_ORDER = [
    "base",
    "melora",
    *MELORA_PATH_VARIANTS,
    "peft_lora_nr",
    "peft_lora_r",
    "mini_loop",
    "block_diag",
    "melora_merged",
    "merged_linear",
]
# --lockstep: column on the first variant's rows <- median over rounds of its sample / the second variant's.
PAIRED = {
    "paired_vs_peft_nr": ("melora", "peft_lora_nr"),
    "paired_vs_loop": ("melora", "mini_loop"),
    "paired_vs_peft_r": ("melora", "peft_lora_r"),
    "paired_vs_merged_linear": ("melora_merged", "merged_linear"),
    "paired_vs_base": ("melora_merged", "base"),
}
PAIRED_CI_LEVEL = 0.95
# --lockstep: within a round, the modules a target compares run next to each other (the loop of
# target 1b one further away from MELoRA than the two PEFT modules of targets 1a and 2).
LOCKSTEP_ORDER = [
    "base",
    "merged_linear",
    "melora_merged",
    "mini_loop",
    "peft_lora_nr",
    "melora",
    "peft_lora_r",
    *MELORA_PATH_VARIANTS,
    "block_diag",
]
CSV_FIELDS = ["device", "dtype", "d", "n", "r", "T", "variant", "mode", "ms", "ratio_to_base", "min_ms", "reps", "spread_pct", "path",
              *(f"{column}{end}" for column in PAIRED for end in ("", "_lo", "_hi"))]  # fmt: skip


# ----------------------------------------------------------------------------- baselines


class MiniLoRALoop(nn.Module):
    """The official MELoRA forward: ``n`` separate mini LoRAs run in a Python loop."""

    def __init__(self, base: nn.Linear, n: int, r: int, scaling: float) -> None:
        super().__init__()
        self.base, self.n, self.scaling = base, n, scaling
        d_in, d_out = base.in_features, base.out_features
        kw = {"bias": False, "dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.ModuleList(nn.Linear(d_in // n, r, **kw) for _ in range(n))
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out // n, **kw) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As ChasonShi/MELoRA peft-0.5.0/src/peft/tuners/melora.py: scale each mini output, concat, add in place.
        result = self.base(x)
        chunks = torch.chunk(x, self.n, dim=-1)
        result += torch.cat([b(a(c)) * self.scaling for a, b, c in zip(self.lora_A, self.lora_B, chunks)], dim=-1)
        return result


class BlockDiagLoRA(nn.Module):
    """MELoRA computed through the dense ``ΔW``, rebuilt on every forward."""

    def __init__(self, base: nn.Linear, n: int, r: int, scaling: float) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        d_in, d_out = base.in_features, base.out_features
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(n, r, d_in // n, **kw))
        self.lora_B = nn.Parameter(torch.empty(n, d_out // n, r, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = torch.block_diag(*torch.bmm(self.lora_B, self.lora_A)) * self.scaling
        return self.base(x) + F.linear(x, delta)


class _Holder(nn.Module):
    """A one-layer model for ``peft.get_peft_model``."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def peft_lora(base: nn.Linear, rank: int) -> nn.Module:
    """PEFT's ``lora.Linear`` of rank ``rank`` wrapping ``base`` (shared, not copied)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["lin"], bias="none")
    # autocast_adapter_dtype=False keeps bf16 factors bf16, as MELoRA's are.
    model = get_peft_model(_Holder(base), config, autocast_adapter_dtype=False)
    return model.base_model.model.lin


def peft_melora(base: nn.Linear, n: int, r: int) -> nn.Module:
    """MELoRA's tuner layer wrapping ``base`` (shared), made by ``peft.get_peft_model`` exactly as :func:`peft_lora` makes LoRA's."""
    from peft import get_peft_model

    config = MELoRAConfig(n=n, r=r, alpha=ALPHA, dropout=0.0, target_modules=["lin"])
    model = get_peft_model(_Holder(base), config, autocast_adapter_dtype=False)
    return model.base_model.model.lin


def randomise_adapter(module: nn.Module) -> None:
    """Non-zero factors everywhere (``B = 0`` at init would be unrepresentative of training)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)


# ----------------------------------------------------------------------------- timing


@dataclass
class Job:
    """One module timed in one mode; ``samples`` are seconds."""

    key: tuple
    call: Callable[[], None]
    reset: Callable[[], None]
    min_reps: int
    target: int = 0
    samples: list[float] = field(default_factory=list)
    path: str = ""  # MELoRALinear's chosen formulation, for melora jobs

    @property
    def ms(self) -> float:
        return statistics.median(self.samples) * 1e3

    @property
    def spread_pct(self) -> float:
        if len(self.samples) < 4:
            return float("nan")
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return 100 * (q3 - q1) / statistics.median(self.samples)


def synchroniser(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_once(job: Job, sync: Callable[[], None]) -> float:
    job.reset()
    sync()
    start = clock()
    job.call()
    sync()
    return clock() - start


def wants_more(job: Job, budget_s: float, max_reps: int) -> bool:
    reps = len(job.samples)
    if reps < job.target:
        return True
    if reps >= max_reps or sum(job.samples) >= NOISY_BUDGET_FACTOR * budget_s:
        return False
    return job.spread_pct > NOISY_SPREAD_PCT


def run_round_robin(jobs: list[Job], budget_s: float, max_reps: int, sync: Callable[[], None], lockstep: bool = False) -> None:
    """Warm each job up, then time one call per job per round until each has enough samples.

    ``lockstep``: every job gets the largest target, one sample per round, so samples pair by index;
    ``block_diag`` (a reference in no target or pair, and the slowest module) keeps its warm-up
    as its one sample and stays out of the rounds.
    """
    for job in jobs:
        warm = time_once(job, sync)
        reference_only = lockstep and job.key[0] == "block_diag"
        if (warm >= HEAVY_CALL_S and not lockstep) or reference_only:  # a kept warm-up would shift a paired job off the rounds
            job.samples.append(warm)
        job.target = max(job.min_reps, min(max_reps, math.ceil(budget_s / max(warm, 1e-6))))
    if lockstep:
        paired = [job for job in jobs if job.key[0] != "block_diag"]
        for i in range(max((job.target for job in paired), default=0)):
            # Alternate the direction: neither job of a pair always runs first (drift within a round, after-effects).
            for job in paired if i % 2 == 0 else reversed(paired):
                job.samples.append(time_once(job, sync))
        return
    while True:
        pending = [job for job in jobs if wants_more(job, budget_s, max_reps)]
        if not pending:
            return
        for job in pending:
            job.samples.append(time_once(job, sync))


def make_job(key: tuple, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, mode: str, min_reps: int = DEFAULT_MIN_REPS) -> Job:
    params = [p for p in module.parameters() if p.requires_grad]

    def reset() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    if mode == "fwd":

        def call() -> None:
            with torch.no_grad():
                module(x)

    else:

        def call() -> None:
            module(x).backward(grad_out)

    if key[0] == "block_diag":
        min_reps = MIN_REPS["block_diag"]
    return Job(key=key, call=call, reset=reset, min_reps=max(min_reps, MIN_REPS.get(key[0], 0)))


# ----------------------------------------------------------------------------- one group


def build_modules(base: nn.Linear, ns: list[int], rs: list[int], mode: str, paths: bool = False) -> dict[tuple, nn.Module]:
    """Every distinct module of a ``(d, T)`` group, keyed by job key."""
    modules: dict[tuple, nn.Module] = {("base",): base}
    for n in ns:
        for r in rs:
            scaling = ALPHA / r
            for rank in dict.fromkeys((n * r, r)):  # n = 1: one module answers both
                modules[("peft", rank, n, r)] = peft_lora(base, rank)
            modules[("melora", n, r)] = peft_melora(base, n, r)
            for path in FORMULATIONS if paths else ():
                modules[("melora_path", path, n, r)] = forced = peft_melora(base, n, r)
                forced.formulation = path
            modules[("mini_loop", n, r)] = MiniLoRALoop(base, n, r, scaling)
            modules[("block_diag", n, r)] = BlockDiagLoRA(base, n, r, scaling)
    for key, module in modules.items():
        if key != ("base",):
            randomise_adapter(module)
    if mode == "fwd":
        merged = MELoRALinear(copy.deepcopy(base), n=max(ns), r=max(rs), alpha=ALPHA)
        randomise_adapter(merged)
        merged.merge()
        modules[("merged",)] = merged
        modules[("merged_linear",)] = merged.base_layer
    return modules


def measure_group(device: torch.device, dtype: torch.dtype, d: int, T: int, mode: str, args) -> dict[tuple, Job]:
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    shape = (T // SEQ_LEN, SEQ_LEN, d) if T % SEQ_LEN == 0 else (1, T, d)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=(mode == "fwdbwd"))
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    modules = build_modules(base, args.n, args.r, mode, args.paths)
    jobs = {key: make_job(key, module, x, grad_out, mode, args.min_reps) for key, module in modules.items()}
    with torch.set_grad_enabled(mode == "fwdbwd"):
        for key, job in jobs.items():
            if isinstance(modules[key], MELoRATunerLinear):
                job.path = modules[key].formulation_for(x)
    order = lockstep_order(args.n, args.r, mode, args.paths) if args.lockstep else list(jobs)
    run_round_robin([jobs[key] for key in order], args.budget, args.max_reps, synchroniser(device), args.lockstep)
    del modules, x, grad_out, base
    gc.collect()
    return jobs


def variant_jobs(n: int, r: int, mode: str, paths: bool = False) -> dict[str, tuple]:
    """Which measured job answers each variant of config ``(n, r)``."""
    keys = {
        "base": ("base",),
        "melora": ("melora", n, r),
        **{f"melora_{path}": ("melora_path", path, n, r) for path in (FORMULATIONS if paths else ())},
        "peft_lora_nr": ("peft", n * r, n, r),
        "peft_lora_r": ("peft", r, n, r),
        "mini_loop": ("mini_loop", n, r),
        "block_diag": ("block_diag", n, r),
    }
    if mode == "fwd":
        keys["melora_merged"] = ("merged",)
        keys["merged_linear"] = ("merged_linear",)
    return keys


def lockstep_order(ns: list[int], rs: list[int], mode: str, paths: bool = False) -> list[tuple]:
    """Every job key of a group once, each config's compared modules together (see ``LOCKSTEP_ORDER``)."""
    order: dict[tuple, None] = {}
    for n in ns:
        for r in rs:
            keys = variant_jobs(n, r, mode, paths)
            order.update((keys[variant], None) for variant in LOCKSTEP_ORDER if variant in keys)
    return list(order)


def median_ci(values: list[float], level: float = PAIRED_CI_LEVEL) -> tuple[float, float]:
    """Distribution-free interval of the median: order statistics ``k`` and ``n + 1 - k``, Binomial(n, 1/2).

    ``k`` is the largest with P(X < k) ≤ (1 - level) / 2; NaNs when there are too few values (< 6 at 95 %).
    """
    n, xs = len(values), sorted(values)
    k, below = 0, 0.0  # below: P(X < k)
    while k < n // 2:
        below_next = below + math.comb(n, k) / 2**n
        if below_next > (1 - level) / 2:
            break
        k, below = k + 1, below_next
    return (xs[k - 1], xs[n - k]) if k else (math.nan, math.nan)


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median over rounds of ``a[i] / b[i]``, and its interval from ``median_ci``."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return (statistics.median(ratios), *median_ci(ratios))


def paired_cells(variant: str, keys: dict[str, tuple], jobs: dict[tuple, Job]) -> dict[str, float]:
    """The ``PAIRED`` columns of one row of a lockstep run."""
    cells = {}
    for column, (first, second) in PAIRED.items():
        if first == variant and second in keys:
            values = paired_ratio(jobs[keys[first]].samples, jobs[keys[second]].samples)
            cells.update((name, round(v, 4)) for name, v in zip((column, f"{column}_lo", f"{column}_hi"), values) if not math.isnan(v))
    return cells


def group_rows(device: str, dtype: str, d: int, T: int, mode: str, jobs: dict[tuple, Job], args) -> list[dict]:
    base_ms = jobs[("base",)].ms
    rows = []
    for n in args.n:
        for r in args.r:
            keys = variant_jobs(n, r, mode, args.paths)
            for variant, key in keys.items():
                job = jobs[key]
                rows.append({
                    "device": device, "dtype": dtype, "d": d, "n": n, "r": r, "T": T,
                    "variant": variant, "mode": mode, "ms": round(job.ms, 4),
                    "ratio_to_base": round(job.ms / base_ms, 4), "min_ms": round(min(job.samples) * 1e3, 4),
                    "reps": len(job.samples),
                    "spread_pct": round(job.spread_pct, 1), "path": job.path if key[0] in ("melora", "melora_path") else "",
                    **(paired_cells(variant, keys, jobs) if args.lockstep else {}),
                })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- targets


class Table:
    """One statistic (``ms`` or ``min_ms``) of the rows, indexed by ``(device, dtype, d, n, r, T, variant, mode)``."""

    def __init__(self, rows: list[dict], stat: str = "ms") -> None:
        self.ms = {self.key(row): row[stat] for row in rows}
        self.configs = sorted({(row["device"], row["dtype"], row["d"], row["n"], row["r"], row["T"]) for row in rows})

    @staticmethod
    def key(row: dict) -> tuple:
        return (row["device"], row["dtype"], row["d"], row["n"], row["r"], row["T"], row["variant"], row["mode"])

    def get(self, config: tuple, variant: str, mode: str = "fwdbwd") -> float | None:
        return self.ms.get((*config, variant, mode))


def cfg_label(config: tuple) -> str:
    device, dtype, d, n, r, T = config
    return f"{device}/{dtype} d={d} n={n} r={r} T={T}"


def check(name: str, worst: tuple | None, limit: float, detail: str, higher_is_better=False) -> dict:
    """A target's verdict from its worst-case ``(value, config, ...)`` over the configs it covers."""
    if worst is None:
        return {"name": name, "status": "n/a", "text": "not measured with these filters"}
    value, config = worst[:2]
    ok = value >= limit if higher_is_better else value <= limit
    bound = "≥" if higher_is_better else "≤"
    return {
        "name": name,
        "status": "PASS" if ok else "FAIL",
        "text": f"worst {value:.3f} (need {bound} {limit:g}) at {cfg_label(config)}; {detail}",
    }


def with_fastest(targets: list[dict], fastest: list[dict]) -> list[dict]:
    """Attach the verdict on fastest samples, a noise check: medians absorb other processes' load."""
    for target, other in zip(targets, fastest):
        worst = other["text"].split(" (need")[0]
        target["fastest"] = f"On fastest samples: {other['status']}, {worst}"
    return targets


def with_paired(targets: list[dict], paired: list[dict]) -> list[dict]:
    """Attach the verdict on paired per-round ratios (``--lockstep``), with its intervals."""
    for target, other in zip(targets, paired):
        target["paired"] = f"On paired per-round ratios: {other['status']}, {other['text']}"
    return targets


def worst_of(values: list[tuple], higher_is_better=False):
    if not values:
        return None
    pick = min if higher_is_better else max
    return pick(values, key=lambda value: value[:2])


def cell_float(row: dict, column: str) -> float:
    """A number of a row, NaN where absent or empty (rows of runs without ``--lockstep``, older CSVs)."""
    value = row.get(column)
    return math.nan if value in (None, "") else float(value)


def fmt_ci(lo: float, hi: float) -> str:
    return "[n/a: < 6 rounds]" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"


def evaluate_targets(rows: list[dict], noise_tol: float, stat: str = "ms") -> list[dict]:
    """PASS/FAIL per target from the medians (``stat="ms"``), the fastest samples (``"min_ms"``) or the
    paired per-round ratios of a ``--lockstep`` run (``"paired"``, the ``PAIRED`` columns).

    A target covers only the configs whose rows exist (filters, or a run still in progress).
    """
    paired = stat == "paired"
    table = Table(rows, "ms" if paired else stat)
    by_key = {Table.key(row): row for row in rows}

    def ratio(config: tuple, variant: str, other: str, mode: str = "fwdbwd") -> tuple[float, tuple, float, float] | None:
        """``(value, config, lo, hi)`` of ``variant / other``; lo, hi NaN except for paired ratios."""
        if not paired:
            value = table.get(config, variant, mode)
            return None if value is None else (value / table.get(config, other, mode), config, math.nan, math.nan)
        column = next(name for name, pair in PAIRED.items() if pair == (variant, other))
        row = by_key.get((*config, variant, mode), {})
        value = cell_float(row, column)
        return None if math.isnan(value) else (value, config, cell_float(row, f"{column}_lo"), cell_float(row, f"{column}_hi"))

    vs_peft, vs_loop, vs_peft_r = [], [], []
    merged_vs_base: dict[tuple, tuple] = {}
    for config in table.configs:
        merged = ratio(config, "melora_merged", "merged_linear", "fwd")
        if merged is not None:  # measured once per (d, T): one value per group
            merged_vs_base[config[:3] + config[5:]] = merged
        vs_peft.append(ratio(config, "melora", "peft_lora_nr"))
        vs_loop.append(ratio(config, "melora", "mini_loop"))
        if int(config[2]) == 4096:
            vs_peft_r.append(ratio(config, "melora", "peft_lora_r"))
    vs_peft, vs_loop, vs_peft_r = ([v for v in values if v is not None] for values in (vs_peft, vs_loop, vs_peft_r))
    limit = 1.0 + noise_tol

    def detail(what: str, values: list[tuple], limit: float, counts: bool = True) -> str:
        text = f"paired ratio {what}" if paired else f"ratio {what}"
        if paired and values:
            text += f", 95 % interval at the worst {fmt_ci(*worst_of(values)[2:])}"
        if counts:
            text += f"; {sum(v[0] > 1.0 for v in values)}/{len(values)} configs above 1.0"
        if paired:  # a FAIL beyond noise: the whole interval above the limit
            text += f"; {sum(v[2] > limit for v in values)}/{len(values)} with the interval above {limit:g}"
        return text

    groups = list(merged_vs_base.values())
    return [
        check("1a. MELoRA(n,r) ≤ 1.03 × PEFT LoRA rank n·r, fwd+bwd, every config", worst_of(vs_peft), limit,
              detail("MELoRA/PEFT", vs_peft, limit)),
        check("1b. MELoRA(n,r) ≤ 1.03 × per-mini-LoRA loop, fwd+bwd, every config", worst_of(vs_loop), limit,
              detail("MELoRA/loop", vs_loop, limit)),
        check("2. MELoRA(n,r) ≤ 1.05 × PEFT LoRA rank r at d=4096, fwd+bwd", worst_of(vs_peft_r), 1.05,
              detail("MELoRA/PEFT (same parameters)", vs_peft_r, 1.05)),
        check("3. merged MELoRA inference ≤ 1.05 × base, fwd", worst_of(groups), 1.05,
              detail(f"merged/its frozen linear over {len(groups)} (d, T) groups", groups, 1.05, counts=False)),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores available to this process (SMT siblings counted once)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        cores, block = set(), {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                block[k] = v
            elif block:
                cores.add((block.get("physical id"), block.get("core id")))
                block = {}
        if cores and None not in {c[1] for c in cores}:
            return max(1, min(available, len(cores)))
    except OSError:
        pass
    return available


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def allocator_setting() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} (LD_PRELOAD={preload})"
    knobs = {k: os.environ[k] for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    if knobs:
        return "glibc malloc with " + " ".join(f"{k}={v}" for k, v in knobs.items())
    return "glibc malloc, default settings (large-tensor CPU timings may be bimodal; use `make bench-layer`)"


def fmt_cell(ms: float, base_ms: float) -> str:
    return f"{ms:.2f} ({ms / base_ms:.2f}×)"


def group_table(rows: list[dict], mode: str) -> str:
    variants = [v for v in VARIANT_ORDER[1:] if any(row["variant"] == v for row in rows)]
    out = io.StringIO()
    out.write("| n | r | path | " + " | ".join(variants) + " |\n")
    out.write("|---:|---:|:---|" + "---:|" * len(variants) + "\n")
    by_config: dict[tuple, dict[str, float]] = {}
    paths: dict[tuple, str] = {}
    for row in rows:
        by_config.setdefault((row["n"], row["r"]), {})[row["variant"]] = row["ms"]
        if row["variant"] == "melora":
            paths[(row["n"], row["r"])] = row.get("path", "")
    for (n, r), cells in sorted(by_config.items()):
        cells_text = " | ".join(fmt_cell(cells[v], cells["base"]) for v in variants)
        out.write(f"| {n} | {r} | {paths.get((n, r), '')} | {cells_text} |\n")
    return out.getvalue()


def paired_table(rows: list[dict]) -> str:
    """The ``PAIRED`` columns of one group (``--lockstep``): median per-round ratio [95 % interval]."""

    def cell(row: dict, column: str) -> str:
        value = cell_float(row, column)
        return "" if math.isnan(value) else f"{value:.3f} {fmt_ci(cell_float(row, column + '_lo'), cell_float(row, column + '_hi'))}"

    columns = [column for column, (variant, _) in PAIRED.items() if variant == "melora"]
    out = io.StringIO()
    out.write("\nPaired ratios (median over rounds of the per-round ratio [95 % interval]):\n\n")
    out.write("| n | r | " + " | ".join(f"melora/{PAIRED[c][1]}" for c in columns) + " |\n")
    out.write("|---:|---:|" + "---:|" * len(columns) + "\n")
    for row in rows:
        if row["variant"] == "melora":
            out.write(f"| {row['n']} | {row['r']} | " + " | ".join(cell(row, c) for c in columns) + " |\n")
    merged = next((row for row in rows if row["variant"] == "melora_merged"), None)
    if merged is not None:
        out.write(
            f"\nmelora_merged/merged_linear: {cell(merged, 'paired_vs_merged_linear')}; "
            f"melora_merged/base: {cell(merged, 'paired_vs_base')}\n"
        )
    return out.getvalue()


def render_markdown(rows: list[dict], targets: list[dict], args, wall_s: float, progress: tuple[int, int]) -> str:
    out = io.StringIO()
    out.write("# MELoRA layer benchmark\n\n")
    done, total = progress
    if done < total:
        out.write(f"**Partial: {done} of {total} groups measured so far (or the run was interrupted).**\n\n")
    out.write(f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n")
    out.write(f"- CPU: {cpu_model()}; torch threads: {torch.get_num_threads()} (physical cores: {physical_cores()})\n")
    if any(row["device"] == "cuda" for row in rows):
        out.write(f"- GPU: {torch.cuda.get_device_name(0)}\n")
    import peft

    out.write(f"- torch {torch.__version__}, peft {peft.__version__}, melora {melora.__version__}, Python {platform.python_version()}\n")
    out.write(f"- Allocator: {allocator_setting()}\n")
    clock_text = "wall clock" if args.clock == "wall" else "process CPU time on one thread (`--clock cpu`)"
    out.write(f"- Clock: {clock_text}\n")
    out.write(f"- Command: `{' '.join(sys.argv)}`; wall time {wall_s / 60:.1f} min\n")
    loads = (args.load_start, load_average())
    out.write(f"- 1-minute load average at start / end: {loads[0]} / {loads[1]}")
    if any(load != "?" and float(load) > torch.get_num_threads() + 0.5 for load in loads):
        out.write(" (above the thread count: other processes shared the cores and inflated the timings)")
    out.write("\n")
    reps = f"≥ {args.min_reps}, base ≥ {max(args.min_reps, MIN_REPS['base'])}"
    if args.lockstep:
        method = (
            f"lockstep round-robin (`--lockstep`): after one warm-up call each (not kept), every module of a group is "
            f"timed once per round for the same number of rounds, the largest repeat count among its modules (about "
            f"{args.budget:g} s of samples, {reps}, ≤ {args.max_reps}), the modules a target compares next to each other "
            "and the direction alternating between rounds. `ms` is a module's median; a *paired* ratio A/B (CSV "
            "`paired_vs_*`, the *paired* target lines and tables) is the median over rounds of A's sample / B's sample "
            "in the same round, which cancels load that drifts over seconds, with a distribution-free 95 % interval "
            "(`_lo`, `_hi`: order statistics of the per-round ratios); a FAIL whose interval lies above the limit is "
            "beyond noise"
        )
    else:
        method = (
            f"median of round-robin samples, about {args.budget:g} s of samples per module "
            f"({reps}, block_diag ≥ {MIN_REPS['block_diag']}, ≤ {args.max_reps})"
        )
    out.write(
        f"- Method: {method}; "
        f"input {SEQ_LEN}-token sequences; `fwd` = inference under no_grad, `fwdbwd` = forward + backward "
        f"with the input requiring grad; α = {ALPHA:g}, s = α/r, dropout 0. `base`, `melora_merged` "
        "(merged at the largest n, r) and `merged_linear` (its own frozen nn.Linear, the merged weight: target 3's "
        "denominator) are measured once per (d, T) and repeated on each row they answer; PEFT LoRA at rank n·r and "
        "at rank r once per config (one module when n = 1), each timed next to the MELoRA layer it is compared with.\n\n"
    )
    out.write("## Targets (full layer)\n\n")
    for t in targets:
        out.write(f"- **{t['status']}** {t['name']}: {t['text']}. *{t['fastest']}*\n")
        if "paired" in t:
            out.write(f"  - *{t['paired']}*\n")
    out.write(
        "\n## Timings\n\nCells: ms (ratio to the frozen base layer in the same run); path: the formulation MELoRALinear chose "
        "(melora.adapters.melora.choose_formulation).\n"
    )
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["device"], row["dtype"], row["d"], row["T"], row["mode"]), []).append(row)
    for (device, dtype, d, T, mode), group in groups.items():
        base_ms = next(row["ms"] for row in group if row["variant"] == "base")
        title = "forward + backward" if mode == "fwdbwd" else "forward (inference, no_grad)"
        out.write(f"\n### {device} {dtype}, d = {d}, T = {T}: {title}; base {base_ms:.2f} ms\n\n")
        out.write(group_table(group, mode))
        if args.lockstep:
            out.write(paired_table(group))
    return out.getvalue()


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        fh.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
    os.replace(tmp, path)


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# ----------------------------------------------------------------------------- main


def write_outputs(rows: list[dict], args, wall_s: float, progress: tuple[int, int]) -> list[dict]:
    targets = with_fastest(evaluate_targets(rows, args.noise_tol), evaluate_targets(rows, args.noise_tol, "min_ms"))
    if args.lockstep:
        targets = with_paired(targets, evaluate_targets(rows, args.noise_tol, "paired"))
    write_atomic(args.out / f"{args.name}.csv", csv_text(rows))
    write_atomic(args.out / f"{args.name}.md", render_markdown(rows, targets, args, wall_s, progress))
    return targets


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def shape_list(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for layer.csv and layer.md")
    p.add_argument("--name", default="layer", help="file stem of the outputs: <out>/<name>.{csv,md} (one per thread count / dtype)")
    p.add_argument("--quick", action="store_true", help="d=768, n in {1,4,16,64}, T=512: a 1-2 minute check")
    p.add_argument("--d", type=int_list, help="comma-separated layer widths (default 768,4096)")
    p.add_argument("--n", type=int_list, help="comma-separated numbers of mini LoRAs (default 1..64, powers of 2)")
    p.add_argument("--r", type=int_list, help="comma-separated mini ranks (default 1,8)")
    p.add_argument("--tokens", type=int_list, help="comma-separated token counts T (default 512,4096)")
    p.add_argument("--shapes", type=shape_list, help="only these (d, T) groups, e.g. 768x512,4096x512 (instead of every --d × --tokens)")
    p.add_argument("--device", default="auto", help="'auto' (cpu, plus cuda if available), 'cpu', 'cuda' or 'cpu,cuda'")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16 is meant for GPUs")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="'cpu': process CPU time on 1 thread, robust to other processes' load (CPU only)",
    )  # fmt: skip
    p.add_argument("--budget", type=float, default=1.0, help="seconds of samples per module (default 1.0)")
    p.add_argument("--max-reps", type=int, default=40)
    p.add_argument(
        "--min-reps",
        type=int,
        default=DEFAULT_MIN_REPS,
        help=f"samples per module at least, whatever the budget (default {DEFAULT_MIN_REPS}); more for slow calls",
    )
    p.add_argument(
        "--lockstep", action="store_true",
        help="every module of a group gets the same samples, one per round (warm-ups not kept), and targets are also "
             "judged on paired ratios: the median over rounds of the per-round ratio, with a 95%% interval",
    )  # fmt: skip
    p.add_argument(
        "--modes",
        type=lambda text: [m for m in text.split(",") if m],
        default=["fwd", "fwdbwd"],
        help="fwd (inference; the merged target) and/or fwdbwd (training; targets 1-2), comma-separated",
    )
    p.add_argument("--paths", action="store_true", help="also time MELoRALinear with each formulation forced (calibrates its cost rule)")
    p.add_argument("--noise-tol", type=float, default=0.03, help="timing-noise allowance of target 1 (default 0.03)")
    args = p.parse_args(argv)
    grid = QUICK_GRID if args.quick else FULL_GRID
    for name in ("d", "n", "r", "tokens"):
        if getattr(args, name) is None:
            setattr(args, name, list(grid[name]))
    if args.quick:
        args.budget = min(args.budget, 0.3)
    return args


def devices(spec: str) -> list[torch.device]:
    if spec == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(name) for name in spec.split(",")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.shapes:
        args.d = sorted({d for d, _ in args.shapes})
        args.tokens = sorted({T for _, T in args.shapes})
    for d in args.d:
        bad = [n for n in args.n if d % n]
        if bad:
            raise SystemExit(f"n={bad} do not divide d={d}")
    if args.clock == "cpu":
        # CPU time is load-robust only on one thread: with more, idle threads spin at barriers.
        if args.threads not in (0, 1) or any(dev.type != "cpu" for dev in devices(args.device)):
            raise SystemExit("--clock cpu measures one CPU thread: use it with --device cpu and no --threads")
        args.threads = 1
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads or physical_cores())
    started = time.perf_counter()
    args.load_start = load_average()
    shapes = args.shapes or [(d, T) for d in args.d for T in args.tokens]
    groups = [(dev, d, T, mode) for dev in devices(args.device) for d, T in shapes for mode in args.modes]
    rows: list[dict] = []
    for done, (device, d, T, mode) in enumerate(groups, start=1):
        t0 = time.perf_counter()
        jobs = measure_group(device, DTYPES[args.dtype], d, T, mode, args)
        rows += group_rows(device.type, args.dtype, d, T, mode, jobs, args)
        print(f"{device.type} d={d} T={T} {mode}: base {jobs[('base',)].ms:.2f} ms, "
              f"{len(jobs)} modules in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        # Rewrite the outputs after every group: an interrupted run still leaves its measurements.
        targets = write_outputs(rows, args, time.perf_counter() - started, progress=(done, len(groups)))
    wall_s = time.perf_counter() - started
    for t in targets:
        print(f"{t['status']}: {t['name']}: {t['text']} [{t['fastest']}]" + (f" [{t['paired']}]" if "paired" in t else ""))
    print(f"wrote {args.out / args.name}.csv and .md in {wall_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
