"""The headline table: Table 2's paired verdicts against LoRA r=8, one row per method, one column per task.

Below the grid, each method's verdicts in words (:func:`in_words`). It is a view of a table the protocol code wrote (``tables/table2_verdicts.csv``,
the dev-halves protocol; ``tables/table2_heldout.csv`` only where no dev-halves
table exists), so it holds no number of its own. Its note says which protocol,
and, while the dev-halves sweep is still running, that the cells are
provisional and how many are settled. Then, for scale (:func:`for_scale`):
LoRA r=8's own test-half score and what a constant prediction scores
(``tables/constant_prediction.csv``), so that a verdict on a task neither
adapter learned is read as such. Last, once runs trained longer exist
(``tables/verdicts_long.csv``), whether MELoRA r=1's verdict against LoRA r=8
is the same after longer training (:func:`longer_training`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from melora.experiments.report.protocol import markdown_table

REFERENCE = "LoRA r=8"
DEV_HALVES = "table2_verdicts.csv"
HELDOUT = "table2_heldout.csv"
CONSTANT = "constant_prediction.csv"  # melora.experiments.report.chance: what one class for every example scores
LONG = "verdicts_long.csv"  # melora.experiments.report.verdicts.long_rows: the default and the longer epochs
VERDICTS = ("better", "worse", "no detectable difference")  # the verdicts that compare; the rest say why none was made

NOTE_DEV_HALVES = (
    "Paired difference to LoRA r=8 on the GLUE dev set's test half (×100, same seeds, 95 % t interval) and the verdict; "
    "every setting's epoch, learning rate (from a grid extended until the best is interior) and MELoRA's n are chosen on "
    "the dev set's other half. MiniLM (the mini profile's stand-in for RoBERTa-base), {seeds}; MELoRA r=1 picks the best "
    "of n ∈ {{2, 4, 8}} where LoRA gets no such choice (each n alone: `table2_verdicts.md`).{status}"
)
PROVISIONAL = (
    " Provisional: the sweep is still running ({progress}); a cell with under three learning rates or with fewer "
    "seeds than the others may still change."
)
NOTE_HELDOUT = (
    "Paired difference to LoRA r=8 on the GLUE dev set (×100, same seeds, 95 % t interval) and the verdict, with each "
    "setting's epoch, learning rate (grid 3e-4, 1e-3, 3e-3) and MELoRA's n chosen on a held-out tenth of the training "
    "subset. MiniLM, {seeds}. This held-out split often cannot rank the learning rates "
    "(`heldout_selection_signal.md`): the dev-halves protocol replaces it."
)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def settled(rows: list[dict[str, str]], wanted: int | dict[str, int] | None = None) -> tuple[bool, str]:
    """Whether every cell of a dev-halves Table 2 has its seeds and a bracketed lr.

    ``wanted``: the seeds the sweeps' specs give each cell, one number for every row or a row → seeds
    mapping (a row missing from it wants as many as the most any row wants); without it, as many as the
    most seeded cell, and at least three. Returns ``(settled, progress)``: the second says how many cells are.
    """
    if not rows:
        return False, "no cells yet"
    most = max(int(r["seeds"]) for r in rows)
    per_row = wanted if isinstance(wanted, dict) else {}
    default = wanted if isinstance(wanted, int) else max(per_row.values(), default=most)
    target = {r["method"]: per_row.get(r["method"], default) for r in rows}
    done = [r for r in rows if int(r["seeds"]) >= target[r["method"]] and "extended" not in r["lr at grid edge"]
            and r["lr"] not in ("", "—")]
    enough = wanted is not None or most >= 3
    fewer: dict[int, list[str]] = {}
    for method, seeds in target.items():
        if seeds != default:
            fewer.setdefault(seeds, []).append(method)
    also = "".join(f"; {seeds} for {', '.join(methods)}" for seeds, methods in fewer.items())
    seeds = f"{default} seeds" + (f" ({also[2:]})" if also else "")
    return len(done) == len(rows) and enough, f"{len(done)} of {len(rows)} cells with {seeds} and a settled grid"


def pivot(rows: list[dict[str, str]], delta: str = "Δ vs LoRA r=8 (paired)", interval: str = "Δ 95% CI") -> tuple[list[str], list[list[str]]]:
    """``(header, body)``: a row per compared method, a column per task, cells ``Δ [CI] verdict``."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != REFERENCE))
    cell = {(r["method"], r["task"]): r for r in rows}
    body = []
    for method in methods:
        line = [method]
        for task in tasks:
            r = cell.get((method, task))
            if r is None or r[delta] in ("", "—"):
                line.append("—")
                continue
            chosen = f", {r['chosen']}" if r.get("chosen") not in (None, "", "-") else ""
            seeds = f", {r['seeds']} seed{'s' if r['seeds'] != '1' else ''}"
            line.append(f"{r[delta]} {r[interval]} {r['verdict']} (lr {r['lr']}{chosen}{seeds})")
        body.append(line)
    return ["vs LoRA r=8", *tasks], body


def in_words(rows: list[dict[str, str]]) -> str:
    """Each compared method's verdicts as one bullet: ``"- MELoRA r=1: worse than LoRA r=8 on CoLA; no detectable difference on SST-2."``."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    bullets = []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != REFERENCE):
        by_verdict: dict[str, list[str]] = {}
        for r in sorted((r for r in rows if r["method"] == method), key=lambda r: tasks.index(r["task"])):
            by_verdict.setdefault(r["verdict"] or "no verdict", []).append(r["task"])
        order = ["better", "worse", "no detectable difference"]
        parts = [f"{v}{' than ' + REFERENCE if v in ('better', 'worse') else ''} on {', '.join(by_verdict[v])}"
                 for v in sorted(by_verdict, key=lambda v: order.index(v) if v in order else len(order))]
        bullets.append(f"- {method}: {'; '.join(parts)}.")
    return "\n".join(bullets) + "\n"


def _interval(text: str) -> tuple[float, float] | None:
    """``"[-2.9, 13.7]"`` → ``(-2.9, 13.7)``; ``None`` for ``"—"`` or an empty cell."""
    try:
        low, high = text.strip("[] ").split(",")
        return float(low), float(high)
    except ValueError:
        return None


def for_scale(rows: list[dict[str, str]], constant: list[dict[str, str]]) -> str:
    """LoRA r=8's test-half mean and a constant prediction's score per task; ``""`` without either.

    A second sentence names the tasks where LoRA r=8's own 95 % interval contains the constant prediction's score:
    there the reference is not distinguishable from predicting one class, and a verdict against it says little.
    """
    found = {r["task"]: r for r in rows if r["method"] == REFERENCE and r["test mean ± std"] not in ("", "—")}
    floor = {r["task"]: r["test half ×100"] for r in constant}
    tasks = [t for t in dict.fromkeys(r["task"] for r in rows) if t in found and t in floor]
    if not tasks:
        return ""
    text = (f"For scale, on the test half (×100): {REFERENCE} at its chosen lr scores "
            + ", ".join(f"{t} {found[t]['test mean ± std'].split(' ±')[0]}" for t in tasks)
            + "; predicting the validation half's most frequent class for every example scores "
            + ", ".join(f"{t} {floor[t]}" for t in tasks) + " (`constant_prediction.md`; a correlation is 0 for any constant).")
    unlearned = [t for t in tasks if (ci := _interval(found[t].get("test 95% CI", ""))) and ci[0] <= float(floor[t]) <= ci[1]]
    if unlearned:
        text += (f" On {', '.join(unlearned)}, {REFERENCE}'s 95 % interval over seeds "
                 + ", ".join(found[t]["test 95% CI"] for t in unlearned)
                 + " contains the constant prediction's score: it is not detectably learned at this scale, and a verdict "
                 "against a reference that does not beat a constant prediction says little.")
    return text + "\n"


def _at_epochs(r: dict[str, str], epochs: int) -> str:
    """``"2 epochs -1.5 [-2.5, -0.4] worse (lr 3e-3, 4 seeds)"``: one line of ``verdicts_long.csv`` against LoRA r=8."""
    seeds = f"{r['seeds']} seed{'' if r['seeds'] == '1' else 's'}"
    if r["Δ vs LoRA r=8 (paired)"] in ("", "—"):
        return f"{epochs} epochs: {r['verdict'] or 'no verdict'} ({seeds})"
    return f"{epochs} epochs {r['Δ vs LoRA r=8 (paired)']} {r['Δ 95% CI']} {r['verdict']} (lr {r['lr']}, {seeds})"


def longer_training(rows: list[dict[str, str]], wanted: int | dict[str, int] | None = None) -> str:
    """Per task, MELoRA r=1 against LoRA r=8 at the default epochs and after longer training, and whether the verdict holds.

    ``rows``: ``tables/verdicts_long.csv`` (each task's lines at two epoch counts; the longer MELoRA line keeps the
    ``n`` chosen at the default epochs). ``wanted``: the seeds per cell of the sweep (:func:`settled`). ``""`` without rows.
    """
    runs = {task: sorted({int(r["epochs"]) for r in rows if r["task"] == task}) for task in dict.fromkeys(r["task"] for r in rows)}
    bullets = []
    for task, epochs in runs.items():
        melora = {int(r["epochs"]): r for r in rows if r["task"] == task and r["method"] != REFERENCE}
        if len(epochs) < 2 or epochs[0] not in melora or epochs[-1] not in melora:
            continue
        short, long = melora[epochs[0]], melora[epochs[-1]]
        if short["verdict"] in VERDICTS and long["verdict"] in VERDICTS:
            outcome = "the same verdict" if short["verdict"] == long["verdict"] else "the verdict changes"
        else:
            outcome = "no verdict to compare yet"
        n = f" ({short['chosen']})" if short.get("chosen") not in (None, "", "-") else ""  # chosen at the default epochs, kept
        bullets.append(f"- {task}, MELoRA r=1{n} against {REFERENCE}: {_at_epochs(short, epochs[0])}; "
                       f"{_at_epochs(long, epochs[-1])}: {outcome}.")
    if not bullets:
        return ""
    longer = [r for r in rows if int(r["epochs"]) == runs[r["task"]][-1]]
    done, progress = settled(longer, wanted)
    status = "" if done else f" Provisional: the longer runs are still being trained ({progress.replace('cells', 'lines')})."
    return ("Does more training change the answer? Each line at its own lr chosen on the validation half, Δ paired over "
            f"common seeds (`verdicts_long.md`).{status}\n\n" + "\n".join(bullets) + "\n")


def headline(tables: Path, wanted_seeds: int | dict[str, int] | None = None) -> str | None:
    """The headline table's Markdown from the Table 2 files in ``tables``; ``None`` when neither exists.

    ``wanted_seeds``: the seeds the dev-halves specs run per cell, for every row or per row (:func:`settled`).
    """
    tables = Path(tables)
    if (tables / DEV_HALVES).is_file():
        rows = read_rows(tables / DEV_HALVES)
        done, progress = settled(rows, wanted_seeds)
        seeds = f"up to {max(int(r['seeds']) for r in rows)} seeds per cell"
        status = "" if done else PROVISIONAL.format(progress=progress)
        scale = for_scale(rows, read_rows(tables / CONSTANT)) if (tables / CONSTANT).is_file() else ""
        long = longer_training(read_rows(tables / LONG), wanted_seeds) if (tables / LONG).is_file() else ""
        return (markdown_table(*pivot(rows), NOTE_DEV_HALVES.format(seeds=seeds, status=status)) + "\n" + in_words(rows)
                + (f"\n{scale}" if scale else "") + (f"\n{long}" if long else ""))
    if (tables / HELDOUT).is_file():
        rows = read_rows(tables / HELDOUT)
        seeds = f"up to {max(int(r['seeds']) for r in rows)} seeds per cell"
        return markdown_table(*pivot(rows), NOTE_HELDOUT.format(seeds=seeds)) + "\n" + in_words(rows)
    return None
