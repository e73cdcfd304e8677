"""Figures 3–5 as matplotlib ``Figure`` objects (no pyplot state), saved as PNG and PDF.

Figure 4 and 5 plot the mean dev metric (×100, error bars: std over seeds) of
LoRA (n = 1) and MELoRA runs against ``n`` or ``r``, one panel per task. Under
the held-out protocol (``heldout=True``) each point is at the learning rate its
mean validation metric chose (:func:`melora.experiments.report.protocol.choose`), and the
dev metric at that lr is plotted. Figure 3
plots, per adapted layer, the number of singular values of ``ΔW`` above 0.1 for
LoRA r=8 and for each MELoRA n×r setting, one panel per (task, setting).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from melora.experiments.report.paper import GLUE_LABELS, METRIC_NAMES, spec_seeds, spec_tasks
from melora.experiments.report.records import completed, label_of, lora_family, scope, selection_of
from melora.experiments.report.spectra import BaseModelFactory, has_spectra, mean_counts, run_spectra
from melora.experiments.report.stats import Cell

FIGURE3_BASELINE = "LoRA r=8"
HELDOUT_SPEC = "figures45_heldout"  # the spec of Figures 4-5 under the held-out protocol: its tasks and seeds
# Same equivalent rank as LoRA r=8 with n× fewer parameters, then LoRA r=8's parameters with n× the rank.
FIGURE3_SETTINGS = ("MELoRA n=2 r=4", "MELoRA n=4 r=2", "MELoRA n=8 r=1", "MELoRA n=2 r=8", "MELoRA n=4 r=8", "MELoRA n=8 r=8")


def _new_figure(panels: int, ncols: int, width: float = 4.0, height: float = 3.2) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, panels))
    nrows = max(1, math.ceil(panels / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(panels)]
    return fig, axes


def _figure_tasks(name: str, records: list[dict], profile: str | None, tasks: list[str] | None) -> list[str]:
    if tasks:
        return list(tasks)
    tasks = spec_tasks(name, profile) if profile else None
    return tasks or sorted({r["task"] for r in records if r.get("task")})


def sweep_points(records: list[dict], task: str, x: str, heldout: bool = False) -> dict[int, dict[int, Cell]]:
    """Line value → x value → dev metric over seeds, for LoRA/MELoRA runs of ``task``.

    ``x`` is ``"n"`` (lines: r) or ``"r"`` (lines: n). ``heldout``: the runs
    chose their epoch on a held-out split; each (n, r) takes the lr with the
    best mean validation metric, and its cell holds the dev metric at that lr.
    """
    points: dict[int, dict[int, Cell]] = defaultdict(lambda: defaultdict(Cell))
    families: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for record in records:
        family = lora_family(record)
        if family is None or record.get("task") != task or not completed(record) or record.get("best_metric") is None:
            continue
        if heldout:
            families[family].append(record)
            continue
        n, r = family
        xv, line = (n, r) if x == "n" else (r, n)
        cell = points[line][xv]
        cell.values.append(float(record["best_metric"]))
        cell.seeds.append(record.get("seed"))
    if heldout:
        for (n, r), choice in heldout_choices(families).items():
            xv, line = (n, r) if x == "n" else (r, n)
            points[line][xv] = Cell(values=[v / 100 for v in choice.dev.values], seeds=list(choice.dev.seeds))
    return points


def heldout_choices(families: dict[tuple[int, int], list[dict]]) -> dict:
    """``(n, r)`` → the :class:`~melora.experiments.report.protocol.Choice` (lr chosen on validation, dev ×100) of its runs."""
    from melora.experiments.report.protocol import choose, collect

    out = {}
    for family, group in families.items():
        cells, _ = collect(group)
        task, row = next(iter(cells))[:2]  # one task and family: one row and setting
        out[family] = choose(cells, task, row)
    return out


def heldout_sweep_rows(records: list[dict], x: str, fixed: tuple[int, ...], model: str | None = None,
                       profile: str | None = None) -> tuple[list[str], list[list[str]]]:
    """The numbers behind a held-out Figure 4 (``x="n"``) or 5 (``x="r"``), with paired verdicts.

    One line per plotted point: its lr (chosen on validation), seeds, dev mean ± std and 95 % t
    interval, and the paired difference to LoRA (n = 1) at the same r over the same seeds.
    """
    from melora.experiments.report.stats import paired_difference

    records, model, profile = scope(records, "glue", model, profile)
    seeds = spec_seeds(HELDOUT_SPEC, profile)
    records = [r for r in records if selection_of(r) == "heldout" and completed(r) and (seeds is None or r.get("seed") in seeds)]
    header = ["task", "line", x, "lr", "seeds", "dev mean ± std", "dev 95% CI", "Δ vs LoRA same r (paired)", "Δ 95% CI", "verdict"]
    body = []
    for task in spec_tasks(HELDOUT_SPEC, profile) or sorted({r["task"] for r in records}):
        families: dict[tuple[int, int], list[dict]] = defaultdict(list)
        for record in records:
            if record.get("task") == task and (family := lora_family(record)) is not None:
                families[family].append(record)
        choices = heldout_choices(families)
        for line in fixed:
            for (n, r), c in sorted(choices.items(), key=lambda item: item[0][::-1] if x == "n" else item[0]):
                if (r if x == "n" else n) != line:
                    continue
                ref = choices.get((1, r))
                d = paired_difference(c.dev, ref.dev) if ref is not None and n != 1 else None
                ci = c.dev.ci95
                body.append([GLUE_LABELS.get(task, task), f"{'r' if x == 'n' else 'n'}={line}", str(n if x == "n" else r), f"{c.lr:g}",
                             str(c.dev.n), f"{c.dev.mean:.1f}" + (f" ± {c.dev.std:.1f}" if c.dev.std is not None else ""),
                             f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "—",
                             f"{d.mean:+.1f}" if d and d.mean is not None else "—",
                             f"[{d.ci[0]:.1f}, {d.ci[1]:.1f}]" if d and d.ci else "—",
                             d.verdict if d else ("reference" if n == 1 else "—")])  # fmt: skip
    return header, body


def plot_sweep(records: list[dict], tasks: list[str], x: str, lines: tuple[int, ...] | None, title: str, heldout: bool = False) -> Figure:
    """One panel per task: the dev metric against ``x`` (``"n"`` or ``"r"``), one line per fixed value of the other."""
    fig, axes = _new_figure(len(tasks), ncols=4)
    other = "r" if x == "n" else "n"
    for ax, task in zip(axes, tasks):
        points = sweep_points(records, task, x, heldout)
        metric = next((r.get("metric") for r in records if r.get("task") == task and r.get("metric")), None)
        ax.set_title(f"{GLUE_LABELS.get(task, task)}" + (f" ({METRIC_NAMES.get(metric, metric)})" if metric else ""))
        shown = [v for v in (lines or sorted(points)) if points.get(v)]
        xs_all = set()
        for value in shown:
            xs = sorted(points[value])
            xs_all.update(xs)
            means = [points[value][v].mean * 100 for v in xs]
            stds = [(points[value][v].std or 0.0) * 100 for v in xs]
            label = f"{other}={value}" + (" (LoRA)" if other == "n" and value == 1 else "")
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
        if xs_all:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(sorted(xs_all)))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(v) for v in sorted(xs_all)])
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("n (number of mini LoRAs)" if x == "n" else "r (rank of each mini LoRA)")
        ax.set_ylabel("dev metric ×100")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    return fig


def _title(what: str, records: list[dict], model: str | None, profile: str | None) -> str:
    seeds = sorted({r.get("seed") for r in records if completed(r)})
    return f"{what}\n{model}, profile {profile}, seeds {', '.join(map(str, seeds))}"


def _sweep_figure(name: str, what: str, x: str, fixed: tuple[int, int], records: list[dict], tasks, model, profile,
                  heldout: bool = False) -> Figure | None:
    """A Figure 4/5 panel grid: dev metric against ``x`` for each value in ``fixed`` of the other axis."""
    records, model, profile = scope(records, "glue", model, profile)
    if heldout:
        records = [r for r in records if selection_of(r) == "heldout"]
        what += " (held-out: epoch, lr chosen on validation; dev ± sample std)"
        # a held-out figure only where its lines have runs (the Table 2/4 runs alone may give none)
        records = [r for r in records if (f := lora_family(r)) is not None and (f[1] if x == "n" else f[0]) in fixed]
        # the held-out spec's tasks and seeds: every point over the same seeds, though Tables 2 and 4 ran some at five
        tasks = tasks or spec_tasks(HELDOUT_SPEC, profile)
        seeds = spec_seeds(HELDOUT_SPEC, profile)
        records = [r for r in records if seeds is None or r.get("seed") in seeds]
    if not records:
        return None
    return plot_sweep(records, _figure_tasks(name, records, profile, tasks), x, fixed, _title(what, records, model, profile), heldout)


def figure4(records: list[dict], tasks: list[str] | None = None, model: str | None = None, profile: str | None = None,
            heldout: bool = False) -> Figure | None:
    """Figure 4: dev metric against n with r fixed to 2 and 4 (n = 1: LoRA r)."""
    return _sweep_figure("figure4", "Figure 4: effect of n at fixed r", "n", (2, 4), records, tasks, model, profile, heldout)


def figure5(records: list[dict], tasks: list[str] | None = None, model: str | None = None, profile: str | None = None,
            heldout: bool = False) -> Figure | None:
    """Figure 5: dev metric against r with n fixed to 1 (LoRA) and 2."""
    return _sweep_figure("figure5", "Figure 5: effect of r at fixed n", "r", (1, 2), records, tasks, model, profile, heldout)


def figure3(records: list[dict], tasks: list[str] | None = None, model: str | None = None, profile: str | None = None,
            threshold: float = 0.1, base_model: BaseModelFactory | None = None,
            settings: tuple[str, ...] = FIGURE3_SETTINGS, baseline: str = FIGURE3_BASELINE,
            cache: dict[str, dict] | None = None) -> Figure | None:
    """Figure 3: per layer, singular values of ΔW above ``threshold``, LoRA r=8 vs each MELoRA n×r.

    One panel per (task, setting) with runs; counts are averaged over seeds.
    ``base_model`` builds a fresh base model for a record (default: the run's own);
    ``cache`` (run_dir → spectra) reuses spectra already computed and keeps new ones.
    """
    records, model, profile = scope(records, "glue", model, profile)
    tasks = _figure_tasks("figure3", records, profile, tasks)
    usable = [r for r in records if completed(r) and r.get("task") in tasks and has_spectra(r)]
    cache = {} if cache is None else cache

    def counts(task: str, setting: str) -> dict[str, dict[int, float]]:
        runs = [r for r in usable if r["task"] == task and label_of(r) == setting]
        for r in runs:
            if r["run_dir"] not in cache:
                cache[r["run_dir"]] = run_spectra(r, threshold, base_model)
        return mean_counts([cache[r["run_dir"]] for r in runs], threshold)

    panels = [(task, setting) for task in tasks for setting in settings if any(r["task"] == task and label_of(r) == setting for r in usable)]
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), ncols=3)
    styles = {0: "-", 1: "--", 2: ":"}
    for ax, (task, setting) in zip(axes, panels):
        for color, (name, data) in zip(("tab:blue", "tab:orange"), (("LoRA r=8", counts(task, baseline)), (setting, counts(task, setting)))):
            for i, (kind, per_layer) in enumerate(sorted(data.items())):
                xs = sorted(per_layer)
                ax.plot(xs, [per_layer[x] for x in xs], styles.get(i, "-."), color=color, marker="o", markersize=3, label=f"{name} ({kind})")
        ax.set_title(f"{GLUE_LABELS.get(task, task)}: {setting} vs LoRA r=8")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"# singular values > {threshold:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(_title("Figure 3: rank of the learned ΔW", records, model, profile), fontsize="medium")
    return fig


def save_figure(fig: Figure, folder: str | Path, name: str) -> list[Path]:
    """``<folder>/<name>.png`` (150 dpi) and ``.pdf``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


FIGURES = {"figure3": figure3, "figure4": figure4, "figure5": figure5}
