"""GPU wall time in bf16: MELoRA against PEFT LoRA and the per-mini-LoRA loop, per layer and per training step.

What is measured, on one CUDA device, with CUDA events (the GPU time between
two events around each call), after warm-up calls, as the median of the
samples; the variants of one group are timed round-robin, one call each per
round:

* the layer grid, ``d ∈ {768, 4096}`` (square layers), ``n ∈ {1, 2, 4, 8, 16,
  64}``, ``r ∈ {1, 2, 8}``, ``T ∈ {512, 4096}`` tokens as ``(T/512, 512, d)``
  batches; every tensor bf16; one forward + ``backward(grad_out)`` of the full
  layer (frozen base included, the input requiring grad) per call. Variants,
  built by ``scripts/bench_layer.py``'s builders: ``base`` (the frozen
  ``nn.Linear``), ``melora`` (``MELoRALinear``, formulation chosen by its cost
  rule: the ``path`` column), ``melora_<path>`` for each of
  ``melora.adapters.melora.FORMULATIONS`` (each formulation forced: what calibrates the rule),
  ``peft_lora_nr`` / ``peft_lora_r`` (PEFT LoRA at rank ``n·r`` / ``r``) and
  ``mini_loop`` (the official Python loop over ``n`` mini LoRAs);
* a training step (forward, loss, backward, AdamW step, zero_grad) of a
  roberta-base-shaped sequence classifier (12 layers, batch 32 × 256 tokens,
  fp32 weights under bf16 autocast, as the trainer runs GLUE) and of a
  LLaMA-2-7B-shaped causal LM with 2 decoder layers (bf16 weights under bf16
  autocast, batch 8 × 256 tokens, as the instruct runs), adapters on the
  query / value projections: MELoRA ``(n, r)`` against PEFT LoRA at ranks
  ``n·r`` and ``r``. Random weights from transformers config classes with the
  shapes of ``melora.experiments.paper_shapes``; nothing is downloaded.

Targets (PASS/FAIL in the report): MELoRA ≤ 1.03 × PEFT LoRA at rank ``n·r``
and ≤ 1.03 × the loop, on every layer config and (the first) on each model's
step; MELoRA ``(n, r)`` ≤ 1.05 × PEFT LoRA at rank ``r`` on the ``d = 4096``
layers.

Outputs: ``<out>/gpu.csv`` (one row per config and variant; ``kind`` is
``layer`` or ``step``) and ``<out>/gpu.md``, rewritten after every group. The
whole run is budgeted to about 2 minutes on an H100/H200-class GPU and stops
measuring new groups after ``--max-minutes`` (default 4.5), so that it ends in
under 5 minutes. Without CUDA it prints one line and exits 0.

Run as ``make bench-gpu``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import gc
import io
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(SCRIPTS.parent))

LAYER_GRID = {"d": [768, 4096], "n": [1, 2, 4, 8, 16, 64], "r": [1, 2, 8], "tokens": [512, 4096]}
# Warm-up calls, then round-robin rounds of one timed call per variant. A layer call takes
# 0.05-5 ms on an H200: the grid's 4 groups of ~100 modules take well under a minute.
LAYER_WARMUP, LAYER_REPS = 3, 15
STEP_WARMUP, STEP_REPS = 3, 10
# The paper's shapes (melora.experiments.paper_shapes); layers, batch and length of one training micro-batch.
STEP_MODELS = {
    "roberta-base": {"layers": 12, "batch": 32, "seq": 256, "targets": ["query", "value"], "dtype": torch.float32},
    "llama2-7b-2layers": {"layers": 2, "batch": 8, "seq": 256, "targets": ["q_proj", "v_proj"], "dtype": torch.bfloat16},
}
STEP_N, STEP_R = 8, 1
DROPOUT = 0.05  # the paper configs' adapter dropout, on both methods' steps
TARGET_NR = 1.03  # MELoRA / PEFT LoRA at rank n·r
TARGET_LOOP = 1.03  # MELoRA / per-mini-LoRA loop
TARGET_R = 1.05  # MELoRA / PEFT LoRA at rank r, d = 4096
CSV_FIELDS = ["kind", "model", "device", "dtype", "d", "n", "r", "T", "variant", "path", "ms", "min_ms", "reps", "ratio_to_base"]
SKIP_MESSAGE = "bench-gpu: skipped, no CUDA device (torch.cuda.is_available() is False); nothing measured"


# ----------------------------------------------------------------------------- configs


def layer_configs(grid: dict[str, list[int]]) -> list[tuple[int, int, int, int]]:
    """Every ``(d, n, r, T)`` of the grid, ``n`` dividing ``d``."""
    return [(d, n, r, T) for d in grid["d"] for T in grid["tokens"] for n in grid["n"] for r in grid["r"] if d % n == 0]


def group_modules(ns: list[int], rs: list[int]) -> list[tuple]:
    """The keys of the distinct modules one ``(d, T)`` group measures; PEFT once per rank."""
    from melora.adapters.melora import FORMULATIONS

    keys: list[tuple] = [("base",)]
    keys += [("peft", rank) for rank in sorted(set(rs) | {n * r for n in ns for r in rs})]
    for n in ns:
        for r in rs:
            keys += [("melora", n, r, "auto"), *[("melora", n, r, path) for path in FORMULATIONS], ("mini_loop", n, r)]
    return keys


def variant_keys(n: int, r: int) -> dict[str, tuple]:
    """The module key answering each variant of layer config ``(n, r)``."""
    from melora.adapters.melora import FORMULATIONS

    return {
        "base": ("base",),
        "melora": ("melora", n, r, "auto"),
        **{f"melora_{path}": ("melora", n, r, path) for path in FORMULATIONS},
        "peft_lora_nr": ("peft", n * r),
        "peft_lora_r": ("peft", r),
        "mini_loop": ("mini_loop", n, r),
    }


# ----------------------------------------------------------------------------- timing


class Timer:
    """Per-call times in ms: CUDA events on a GPU; ``perf_counter`` elsewhere (to check the script, not to measure)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[list[float], object, object]] = []

    def time(self, samples: list[float], call: Callable[[], None]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            self.pending.append((samples, start, end))
        else:
            t0 = time.perf_counter()
            call()
            samples.append((time.perf_counter() - t0) * 1e3)

    def flush(self) -> None:
        """Read the events of the calls queued so far (one synchronisation per round, not per call)."""
        if self.cuda:
            torch.cuda.synchronize()
            for samples, start, end in self.pending:
                samples.append(start.elapsed_time(end))
        self.pending = []


def round_robin(
    calls: dict[tuple, tuple[Callable[[], None], Callable[[], None]]], warmup: int, reps: int, timer: Timer
) -> dict[tuple, list[float]]:
    """``{key: (call, reset)}`` → ``{key: samples in ms}``: ``warmup`` untimed calls each, then ``reps`` rounds."""
    for call, reset in calls.values():
        for _ in range(warmup):
            reset()
            call()
    timer.flush()
    samples: dict[tuple, list[float]] = {key: [] for key in calls}
    for _ in range(reps):
        for key, (call, reset) in calls.items():
            reset()
            timer.time(samples[key], call)
        timer.flush()
    return samples


def summary(samples: list[float]) -> dict:
    return {"ms": round(statistics.median(samples), 4), "min_ms": round(min(samples), 4), "reps": len(samples)}


# ----------------------------------------------------------------------------- layer grid


def build_group(base, ns: list[int], rs: list[int]) -> dict[tuple, torch.nn.Module]:
    """Every module of a ``(d, T)`` group around the shared frozen ``base``, with non-zero factors."""
    from bench_layer import ALPHA, MiniLoRALoop, peft_lora, randomise_adapter

    from melora import MELoRALinear

    modules: dict[tuple, torch.nn.Module] = {}
    for key in group_modules(ns, rs):
        if key[0] == "base":
            modules[key] = base
        elif key[0] == "peft":
            modules[key] = peft_lora(base, key[1])
        elif key[0] == "melora":
            _, n, r, path = key
            modules[key] = layer = MELoRALinear(base, n=n, r=r, alpha=ALPHA)
            layer.formulation = path
        else:
            _, n, r = key
            modules[key] = MiniLoRALoop(base, n, r, ALPHA / r)
        if key[0] != "base":
            randomise_adapter(modules[key])
    return modules


def measure_layer_group(
    device: torch.device, dtype: torch.dtype, d: int, T: int, ns: list[int], rs: list[int], warmup: int, reps: int
) -> list[dict]:
    """The rows of one ``(d, T)`` group: one per ``(n, r)`` and variant."""
    from bench_layer import SEQ_LEN, make_job

    torch.manual_seed(0)
    base = torch.nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    shape = (T // SEQ_LEN, SEQ_LEN, d) if T % SEQ_LEN == 0 else (1, T, d)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    modules = build_group(base, ns, rs)
    jobs = {key: make_job(key, module, x, grad_out, "fwdbwd") for key, module in modules.items()}
    paths = {key: module.formulation_for(x) for key, module in modules.items() if key[0] == "melora"}
    samples = round_robin({key: (job.call, job.reset) for key, job in jobs.items()}, warmup, reps, Timer(device))
    base_ms = statistics.median(samples[("base",)])
    rows = []
    for n in ns:
        for r in rs:
            for variant, key in variant_keys(n, r).items():
                stats = summary(samples[key])
                rows.append({
                    "kind": "layer", "model": "", "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                    "d": d, "n": n, "r": r, "T": T, "variant": variant, "path": paths.get(key, ""),
                    **stats, "ratio_to_base": round(stats["ms"] / base_ms, 4),
                })  # fmt: skip
    del modules, jobs, x, grad_out, base
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- training steps


def build_model(name: str, spec: dict, device: torch.device, hidden: int | None = None):
    """A random-weight model with the paper model's architecture (``hidden`` shrinks it, for checks only)."""
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification

    from melora.experiments.paper_shapes import LLAMA2_7B, ROBERTA_BASE

    torch.manual_seed(0)
    shrink = {} if hidden is None else {"hidden_size": hidden, "intermediate_size": 2 * hidden, "vocab_size": 512}
    with torch.device(device):  # initialise on the device: a 32000 × 4096 embedding is slow to fill on a CPU
        if name.startswith("roberta"):
            heads = {} if hidden is None else {"num_attention_heads": 4}
            config = RobertaConfig(**{**ROBERTA_BASE, "num_hidden_layers": spec["layers"], "num_labels": 2, **shrink, **heads})
            model = RobertaForSequenceClassification(config)
        else:
            heads = {} if hidden is None else {"num_attention_heads": 4, "num_key_value_heads": 4}
            model = LlamaForCausalLM(LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": spec["layers"], **shrink, **heads}))
    return model.to(spec["dtype"]), model.config.vocab_size


def step_variants(model, spec: dict, n: int, r: int) -> dict[str, torch.nn.Module]:
    """MELoRA ``(n, r)`` and PEFT LoRA at ranks ``n·r`` and ``r``, each on its own copy of ``model``."""
    import peft

    import melora

    saved = ["classifier"] if hasattr(model, "classifier") else []

    def lora(rank: int):
        config = peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=DROPOUT, target_modules=spec["targets"], modules_to_save=saved or None)
        return peft.get_peft_model(copy.deepcopy(model), config, autocast_adapter_dtype=False)

    return {
        "melora": melora.inject(
            copy.deepcopy(model), melora.MELoRAConfig(n=n, r=r, dropout=DROPOUT, target_modules=spec["targets"], modules_to_save=saved)
        ),
        "peft_lora_nr": lora(n * r),
        "peft_lora_r": lora(r),
    }


def melora_paths(model, batch: dict) -> str:
    """The formulations MELoRA's layers choose in one training forward, e.g. ``"fused"``."""
    import melora

    seen: set[str] = set()
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: seen.add(module.formulation_for(args[0])))
        for layer in melora.adapter_layers(model).values()
    ]
    try:
        with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16):
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return "+".join(sorted(seen))


def measure_steps(
    name: str, spec: dict, device: torch.device, n: int, r: int, warmup: int, reps: int, hidden: int | None = None
) -> list[dict]:
    """The rows of one model: a training step per variant."""
    model, vocab = build_model(name, spec, device, hidden)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), device=device, generator=gen)
    labels = torch.randint(0, 2, (spec["batch"],), device=device, generator=gen) if name.startswith("roberta") else ids
    batch = {"input_ids": ids, "labels": labels}
    variants = step_variants(model, spec, n, r)
    del model
    calls, paths = {}, {}
    for variant, m in variants.items():
        m.train()
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, optimizer=optimizer) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = m(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        calls[(variant,)] = (step, lambda: None)
        if variant == "melora":
            paths[(variant,)] = melora_paths(m, batch)
    samples = round_robin(calls, warmup, reps, Timer(device))
    d = variants["melora"].config.hidden_size
    rows = []
    for (variant,), s in samples.items():
        rows.append({
            "kind": "step", "model": name, "device": device.type, "dtype": "bf16-autocast", "d": d, "n": n, "r": r,
            "T": spec["batch"] * spec["seq"], "variant": variant, "path": paths.get((variant,), ""), **summary(s), "ratio_to_base": "",
        })  # fmt: skip
    del variants, calls
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- report


def check(name: str, ratios: list[tuple[float, str]], limit: float) -> dict:
    """A target's verdict from the worst ratio over the configs it covers."""
    if not ratios:
        return {"name": name, "status": "n/a", "text": "not measured"}
    worst, where = max(ratios)
    over = sum(ratio > limit for ratio, _ in ratios)
    status = "PASS" if worst <= limit else "FAIL"
    return {"name": name, "status": status, "text": f"worst {worst:.3f} (need ≤ {limit:g}) at {where}; {over}/{len(ratios)} configs over"}


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """PASS/FAIL per target from the medians of ``rows``."""
    ms = {(row["kind"], row["model"], row["d"], row["n"], row["r"], row["T"], row["variant"]): row["ms"] for row in rows}
    nr, loop, same_params, steps = [], [], [], []
    for (kind, model, d, n, r, T, variant), value in ms.items():
        if variant != "melora":
            continue
        other = {v: ms.get((kind, model, d, n, r, T, v)) for v in ("peft_lora_nr", "peft_lora_r", "mini_loop")}
        if kind == "layer":
            where = f"d={d} n={n} r={r} T={T}"
            nr.append((value / other["peft_lora_nr"], where))
            loop.append((value / other["mini_loop"], where))
            if d == 4096:
                same_params.append((value / other["peft_lora_r"], where))
        else:
            steps.append((value / other["peft_lora_nr"], f"{model} n={n} r={r}"))
    return [
        check(f"1. layer: MELoRA(n, r) ≤ {TARGET_NR} × PEFT LoRA rank n·r, fwd+bwd", nr, TARGET_NR),
        check(f"2. layer: MELoRA(n, r) ≤ {TARGET_LOOP} × per-mini-LoRA loop, fwd+bwd", loop, TARGET_LOOP),
        check(f"3. layer: MELoRA(n, r) ≤ {TARGET_R} × PEFT LoRA rank r at d=4096, fwd+bwd", same_params, TARGET_R),
        check(f"4. training step: MELoRA(n, r) ≤ {TARGET_NR} × PEFT LoRA rank n·r", steps, TARGET_NR),
    ]


def fastest_path(cells: dict[str, float]) -> str:
    from melora.adapters.melora import FORMULATIONS

    return min(FORMULATIONS, key=lambda path: cells[f"melora_{path}"])


def layer_columns() -> list[str]:
    from melora.adapters.melora import FORMULATIONS

    return ["melora", *[f"melora_{path}" for path in FORMULATIONS], "peft_lora_nr", "peft_lora_r", "mini_loop"]


def render_markdown(rows: list[dict], targets: list[dict], meta: dict) -> str:
    """The report: environment, targets, the layer tables per ``(d, T)`` and the training steps."""
    out = io.StringIO()
    out.write("# MELoRA GPU benchmark (bf16)\n\n")
    if meta.get("partial"):
        out.write(f"**Partial: {meta['partial']}.**\n\n")
    for key in ("date", "device", "versions", "command", "method", "wall"):
        if key in meta:
            out.write(f"- {key.capitalize()}: {meta[key]}\n")
    out.write("\n## Targets\n\n")
    for t in targets:
        out.write(f"- **{t['status']}** {t['name']}: {t['text']}\n")
    layers = [row for row in rows if row["kind"] == "layer"]
    groups: dict[tuple, dict[tuple, dict[str, dict]]] = {}
    for row in layers:
        groups.setdefault((row["d"], row["T"]), {}).setdefault((row["n"], row["r"]), {})[row["variant"]] = row
    if groups:
        out.write(
            "\n## Layer, forward + backward\n\nCells: ms (ratio to the frozen base layer). `path`: the formulation the "
            "cost rule chose; `fastest`: the fastest forced formulation, what calibrating the rule aims at.\n"
        )
    for (d, T), configs in groups.items():
        base_ms = next(iter(configs.values()))["base"]["ms"]
        out.write(f"\n### d = {d}, T = {T}; base {base_ms:.3f} ms\n\n")
        columns = layer_columns()
        out.write("| n | r | path | fastest | " + " | ".join(columns) + " |\n")
        out.write("|---:|---:|:---|:---|" + "---:|" * len(columns) + "\n")
        for (n, r), cells in sorted(configs.items()):
            ms = {variant: row["ms"] for variant, row in cells.items()}
            text = " | ".join(f"{ms[v]:.3f} ({ms[v] / base_ms:.2f}×)" for v in columns)
            out.write(f"| {n} | {r} | {cells['melora']['path']} | {fastest_path(ms)} | {text} |\n")
    steps = [row for row in rows if row["kind"] == "step"]
    if steps:
        out.write("\n## Training step (forward, loss, backward, AdamW), bf16 autocast\n\n")
        out.write("| model | n | r | tokens | variant | MELoRA path | ms | ratio to MELoRA |\n|:---|---:|---:|---:|:---|:---|---:|---:|\n")
        melora_ms = {row["model"]: row["ms"] for row in steps if row["variant"] == "melora"}
        for row in steps:
            out.write(
                f"| {row['model']} | {row['n']} | {row['r']} | {row['T']} | {row['variant']} | {row['path']} | "
                f"{row['ms']:.2f} | {row['ms'] / melora_ms[row['model']]:.3f} |\n"
            )
    return out.getvalue()


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_outputs(out_dir: Path, rows: list[dict], meta: dict) -> list[dict]:
    from melora.files import atomic_write_text

    targets = evaluate_targets(rows)
    atomic_write_text(out_dir / "gpu.csv", csv_text(rows))
    atomic_write_text(out_dir / "gpu.md", render_markdown(rows, targets, meta))
    return targets


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench_layer import int_list

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for gpu.csv and gpu.md")
    for name, help_text in (("d", "layer widths"), ("n", "numbers of mini LoRAs"), ("r", "mini ranks"), ("tokens", "token counts T")):
        p.add_argument(
            f"--{name}", type=int_list, default=LAYER_GRID[name], help=f"comma-separated {help_text} (default {LAYER_GRID[name]})"
        )
    p.add_argument(
        "--models",
        default=",".join(STEP_MODELS),
        help=f"comma-separated training-step models, '' for none (default: {','.join(STEP_MODELS)})",
    )
    p.add_argument("--step-n", type=int, default=STEP_N)
    p.add_argument("--step-r", type=int, default=STEP_R)
    p.add_argument("--reps", type=int, default=LAYER_REPS, help=f"timed rounds per layer group (default {LAYER_REPS})")
    p.add_argument("--step-reps", type=int, default=STEP_REPS, help=f"timed rounds of training steps (default {STEP_REPS})")
    p.add_argument("--max-minutes", type=float, default=4.5, help="no new group starts after this (default 4.5)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    import peft

    import melora

    device = torch.device("cuda")
    started = time.perf_counter()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "versions": f"torch {torch.__version__} (CUDA {torch.version.cuda}), peft {peft.__version__}, melora {melora.__version__}, "
        f"Python {platform.python_version()}",
        "command": f"`{' '.join(sys.argv)}`",
        "method": f"CUDA events, {LAYER_WARMUP} warm-up calls then {args.reps} round-robin rounds per layer group "
        f"({STEP_WARMUP} + {args.step_reps} for training steps); median ms; layers bf16, n dividing d.",
    }
    groups = [("layer", d, T) for d in args.d for T in args.tokens] + [("step", name) for name in args.models.split(",") if name]
    rows: list[dict] = []
    targets: list[dict] = []
    for done, group in enumerate(groups):
        if time.perf_counter() - started > args.max_minutes * 60:
            meta["partial"] = f"stopped after {done} of {len(groups)} groups at --max-minutes {args.max_minutes:g}"
            break
        t0 = time.perf_counter()
        if group[0] == "layer":
            _, d, T = group
            ns = [n for n in args.n if d % n == 0]
            rows += measure_layer_group(device, torch.bfloat16, d, T, ns, args.r, LAYER_WARMUP, args.reps)
        else:
            rows += measure_steps(group[1], STEP_MODELS[group[1]], device, args.step_n, args.step_r, STEP_WARMUP, args.step_reps)
        torch.cuda.empty_cache()
        print(f"{' '.join(map(str, group))}: {time.perf_counter() - t0:.0f} s", flush=True)
        meta["wall"] = f"{(time.perf_counter() - started) / 60:.1f} min"
        targets = write_outputs(args.out, rows, meta)  # after every group: an interrupted run leaves its measurements
    for t in targets:
        print(f"{t['status']}: {t['name']}: {t['text']}")
    print(f"wrote {args.out / 'gpu.csv'} and {args.out / 'gpu.md'} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
