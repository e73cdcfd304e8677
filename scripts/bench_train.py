"""Training throughput and memory: MELoRA vs PEFT LoRA on one model and task, side by side.

Every variant trains the same model (a fresh copy per variant) on the same
batches of real task data, with AdamW on its trainable parameters; rounds of
steps are interleaved across variants so that machine noise hits all alike.
Reported per variant: samples/s (median over rounds), trainable parameters,
AdamW state bytes (exact: the sum of the optimiser's state tensors), and peak
accelerator memory on CUDA. Variants:

- ``melora``: MELoRA (r, n) — equivalent rank n·r, (d_in+d_out)·r params/layer;
- ``peft_lora_same_rank``: PEFT LoRA at rank n·r (same equivalent rank);
- ``peft_lora_same_params``: PEFT LoRA at rank r (same parameter count).

    python scripts/bench_train.py --task mrpc --n 8 --r 1 --steps 30 --out results/bench
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import melora  # noqa: E402
from melora.experiments.runs import device_info  # noqa: E402
from melora.files import atomic_write_text


def batches(task: str, model_spec: dict, batch_size: int, max_length: int, count: int):
    from melora.experiments.data.glue import glue_collator, load_glue, subsample, tokenize_glue
    from melora.experiments.models import load_tokenizer

    tokenizer = load_tokenizer(model_spec)
    ds = load_glue(task)
    ds["train"] = subsample(ds["train"], batch_size * count, seed=0)
    train = tokenize_glue(ds, tokenizer, task, max_length)["train"]
    collate = glue_collator(tokenizer)
    return [collate([train[i] for i in range(k * batch_size, (k + 1) * batch_size)]) for k in range(count)]


def build_variants(base, targets: list[str], n: int, r: int) -> dict[str, torch.nn.Module]:
    import peft

    def lora(rank: int):
        cfg = peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.05, target_modules=targets, modules_to_save=["classifier"])
        return peft.get_peft_model(copy.deepcopy(base), cfg)

    return {
        f"melora_n{n}_r{r}": melora.inject(copy.deepcopy(base), melora.MELoRAConfig(n=n, r=r, target_modules=targets, modules_to_save=["classifier"])),
        f"peft_lora_r{n * r}_same_rank": lora(n * r),
        f"peft_lora_r{r}_same_params": lora(r),
    }


def adapter_state_bytes(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> int:
    """AdamW state of the adapter matrices only (the head is common to all variants)."""
    head = {id(p) for n, p in model.named_parameters() if "classifier" in n}
    return sum(
        t.numel() * t.element_size()
        for p, state in optimizer.state.items()
        if id(p) not in head
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--model", default="minilm", help="configs/model/<name>.yaml")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--r", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (split into rounds)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--name", default="train", help="report file stem: <out>/<name>.md")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd copies of MELoRA and PEFT LoRA rank r (as trainer.compile=true)")
    args = parser.parse_args()

    import yaml

    from melora.experiments.models import load_sequence_classifier

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "model" / f"{args.model}.yaml").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    per_round = max(1, args.steps // args.rounds)
    data = batches(args.task, spec, args.batch_size, args.max_length, per_round)
    data = [{k: v.to(device) for k, v in b.items()} for b in data]
    torch.manual_seed(0)
    base = load_sequence_classifier(spec, num_labels=2)
    variants = build_variants(base, list(spec["target_modules"]), args.n, args.r)
    if args.compile:
        for name in list(variants)[::2]:  # MELoRA and PEFT LoRA rank r: the same parameters
            variants[f"{name}_compiled"] = torch.compile(build_variants(base, list(spec["target_modules"]), args.n, args.r)[name])
    optimizers = {}
    for name, model in variants.items():
        model.to(device).train()
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_round(name: str) -> float:
        model, opt = variants[name], optimizers[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in data:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(data) * args.batch_size / (time.perf_counter() - start)

    for name in variants:  # warm-up (allocates optimiser state)
        train_round(name)
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    peak: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            speeds[name].append(train_round(name))
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2**20

    rows = []
    for name, model in variants.items():
        trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
        rows.append((name, statistics.median(speeds[name]), trainable, adapter_state_bytes(optimizers[name], model), peak.get(name)))
    ref = rows[0]
    lines = [
        "# Training throughput: MELoRA vs PEFT LoRA",
        "",
        f"{dt.date.today().isoformat()} · model `{args.model}` ({spec.get('name_or_path')}) · task {args.task} (real training batches) · "
        f"batch {args.batch_size}, max length {args.max_length} · {args.rounds} interleaved rounds of {per_round} steps, median · "
        f"device {device_info().get('cuda') or device_info().get('cpu')} ({torch.get_num_threads()} threads) · torch {torch.__version__}",
        "",
        "| variant | samples/s | vs MELoRA | adapter params | adapter AdamW state (KiB) | state vs MELoRA | peak GPU MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, speed, params, state, mem in rows:
        lines.append(
            f"| {name} | {speed:.1f} | {speed / ref[1]:.3f} | {params:,} | {state / 1024:.1f} | {state / ref[3]:.2f}× | "
            f"{'n/a (CPU)' if mem is None else f'{mem:.0f}'} |"
        )
    same_rank, same_params = rows[1], rows[2]
    lines += [
        "",
        "## Targets",
        f"- MELoRA (r={args.r}, n={args.n}) at least as fast as LoRA r={args.n * args.r}: "
        f"{ref[1]:.1f} vs {same_rank[1]:.1f} samples/s → {'PASS' if ref[1] >= same_rank[1] * 0.98 else 'FAIL'} (2% noise allowance)",
        f"- MELoRA (r={args.r}, n={args.n}) ≥ 0.97 × PEFT LoRA r={args.r} (the same parameters and adapter FLOPs): "
        f"{ref[1]:.1f} vs {same_params[1]:.1f} samples/s, ratio {ref[1] / same_params[1]:.3f} → "
        f"{'PASS' if ref[1] >= 0.97 * same_params[1] else 'FAIL'}",
        f"- adapter optimiser state {args.n}× smaller than LoRA r={args.n * args.r}: ratio {same_rank[3] / ref[3]:.2f} → "
        f"{'PASS' if abs(same_rank[3] / ref[3] - args.n) < 1e-6 else 'FAIL'}",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    compiled = [row for row in rows if row[0].endswith("_compiled")]
    if compiled:
        eager = {row[0]: row[1] for row in rows}
        lines += ["", "## torch.compile (inductor, default mode; compile time excluded: the warm-up round compiles)"]
        lines += [f"- {name}: {speed:.1f} samples/s, {speed / eager[name.removesuffix('_compiled')]:.3f}× its eager speed" for name, speed, *_ in compiled]
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
