"""The dev-halves protocol's report: Tables 2 and 4 with paired verdicts, the lr curves, longer training.

Every run of ``selection=dev_halves`` trained on the whole training subset and
chose its best epoch on the validation half of the GLUE dev set; it recorded the
test half's metric at that epoch (``best_metrics["test_<metric>"]``). The tables
are :mod:`melora.experiments.report.protocol`'s under
:data:`~melora.experiments.report.protocol.DEV_HALVES`: per setting, the lr with the highest
mean validation metric over the seeds every lr of the setting has
(:func:`melora.experiments.report.bracket.bracket`: ties go to the smaller lr, a diverged run
or an undefined metric ranks lowest), then MELoRA's n at its chosen lr; the test
half is reported, never read for a choice, with paired verdicts against the
reference row.

- :data:`TABLE2_VERDICTS`, :data:`TABLE4_VERDICTS`: the layouts (Table 2 also
  has each n of MELoRA r=1 as a row of its own); :func:`build` a table at the
  default epochs (each task's fewest) or others; :func:`note` its paragraph.
- :func:`curves`, :func:`lr_figure`, :func:`lr_rows`, :func:`dominance`: the
  test-half metric against lr, one line per Table 2 setting.
- :func:`long_rows`: LoRA r=8 and MELoRA r=1 after three times the epochs,
  beside the default epochs' verdict.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from melora.adapters import config_from_dict
from melora.experiments.report import protocol
from melora.experiments.report.bracket import ranked
from melora.experiments.report.chance import Floor, floors
from melora.experiments.report.chance import in_words as floors_in_words
from melora.experiments.report.paper import GLUE_LABELS, GLUE_ORDER, METRIC_NAMES
from melora.experiments.report.protocol import DEV_HALVES, REFERENCE, TABLE4, HeldoutTable, Layout, choice_columns, choice_header, lr_text
from melora.experiments.report.records import selection_of
from melora.experiments.report.stats import Cell

BEST_OF_N = "MELoRA r=1"
PER_N = (2, 4, 8)  # the n the best-of-n row chooses among (experiments/verdicts.yaml)
PER_N_ROWS = tuple(f"MELoRA n={n} r=1" for n in PER_N)
BASELINES = ("DyLoRA r=8", "AdaLoRA r=8", "Delta-LoRA r=8")
LONG_TASKS = ("sst2", "stsb")
LONG_FACTOR = 3


def per_n_row(method_config: dict) -> str | None:
    """The row of one n of MELoRA r=1 on its own (``"MELoRA n=4 r=1"``); ``None`` for every other config."""
    return config_from_dict(method_config).label() if protocol.row_of(method_config) == BEST_OF_N else None


def _in_table2(method_config: dict) -> bool:
    # The best-of-n row chooses among PER_N only, so the tuning budget the note states is the one it had.
    return method_config.get("method") != "melora" or method_config.get("r") != 1 or method_config.get("n") in PER_N


TABLE2_ROWS = protocol.ROW_ORDER + PER_N_ROWS
TABLE2_VERDICTS = Layout(
    "table2_verdicts", TABLE2_ROWS, {row: REFERENCE for row in TABLE2_ROWS[1:]}, keep=_in_table2, also=per_n_row, protocol=DEV_HALVES,
    remark=("Tuning budget: every row gets the same lr grid rule, but the MELoRA r=1 (best of n) row also picks among three n "
            f"({', '.join(map(str, PER_N))}) on the validation half where LoRA r=8 has one setting, so it has three chances to look "
            "best; the rows " + ", ".join(PER_N_ROWS) + " show each n alone at its own chosen lr (the best-of-n row repeats the row "
            "of the n it chose)."),
)
# Table 4: LoRA r=R against MELoRA n=2 r=R/2, each paired with LoRA at the same equivalent rank R.
TABLE4_VERDICTS = replace(TABLE4, name="table4_verdicts", protocol=DEV_HALVES,
                          remark=TABLE4.remark + " Every row is one setting with the same lr grid rule: equal tuning budgets.")
LAYOUTS = (TABLE2_VERDICTS, TABLE4_VERDICTS)

NOTE = (
    "Dev-halves protocol. Every run trains on the whole training subset; the GLUE dev set is split once into a validation half and a "
    "test half (stratified by label, STS-B by score bins; the same halves for every run of a task). Each run's epoch, then {chooses} "
    "are chosen on the validation half ('validation': its metric ×100, mean over seeds); 'test' is the test-half metric ×100 at the "
    "chosen epoch, reported and never used to choose anything. Selection rule: for each setting, the lr with the highest mean "
    "validation metric over the seeds every lr of that setting has (ties: the smaller lr; a run that diverged, or whose metric is "
    "undefined, ranks below every other){then_n}. 'lrs tried': the setting's grid, which starts at 1e-3, 3e-3, 1e-2 and grows by one "
    "step of about 3x on the side where the best mean validation metric sits at an edge ('(collapsed)': a run at that lr diverged or "
    "gave an undefined metric; under three lrs the grid is still being run and the choice is provisional); 'lr at grid edge': the "
    "chosen lr is still the grid's largest (top) or smallest (bottom), and why: 'grid limit' (the next step is outside the searched "
    "range), 'flat' (it ties its neighbour: nothing to bracket) or 'still being extended'. Intervals: 95 % t intervals over seeds; "
    "they measure training randomness (initialisation and data order) on one fixed test half, not the sampling of test data: another "
    "test set would add its own variation. Δ: the paired difference over common seeds against {against} at its own chosen lr; verdict"
    " 'better'/'worse' only when its interval excludes 0, 'too few seeds' under two paired seeds, 'collapsed run' when a paired run "
    "diverged."
)


def note(layout: Layout) -> str:
    """The paragraph above a dev-halves table: the protocol, the selection rule, what its intervals measure, its tuning budget."""
    chooses_n = layout.chooses_n
    against = layout.against + ("" if layout.single_reference or layout.versus else " (the 'reference' column)")
    text = NOTE.format(chooses="each setting's lr, then MELoRA's n," if chooses_n else "each row's lr,",
                       then_n="; then the n with the highest mean validation metric at its chosen lr" if chooses_n else "",
                       against=against)
    return text + (f" {layout.remark}" if layout.remark else "")


def default_epochs(records: list[dict]) -> dict[str, int]:
    """Task → the fewest epochs any of its dev-halves GLUE runs trained for: the specs' schedule (longer runs are another table's)."""
    fewest: dict[str, int] = {}
    for r in records:
        if r.get("kind") == "glue" and selection_of(r) == DEV_HALVES.split and (epochs := protocol.epochs_of(r)) is not None:
            fewest[r["task"]] = min(epochs, fewest.get(r["task"], epochs))
    return fewest


def _epochs(records: list[dict], epochs: int | dict[str, int] | None) -> dict[str, int]:
    if epochs is None:
        return default_epochs(records)
    if isinstance(epochs, int):
        return {task: epochs for task in default_epochs(records)}
    return dict(epochs)


def build(records: list[dict], layout: Layout = TABLE2_VERDICTS, epochs: int | dict[str, int] | None = None,
          tasks: list[str] | None = None) -> HeldoutTable:
    """The dev-halves table ``layout`` of the runs that trained for ``epochs``.

    ``epochs``: one number for every task, ``{task: epochs}``, or ``None``: each task's fewest (:func:`default_epochs`).
    """
    return protocol.build(records, tasks, layout, _epochs(records, epochs))


# ---- the lr curves -------------------------------------------------------------------------------------------------

LINE_ROWS = ("LoRA r=8", "MELoRA r=8", *PER_N_ROWS, *BASELINES)  # BEST_OF_N is one of the per-n lines
LINE_COLOURS = dict(zip(LINE_ROWS, ("black", "tab:purple", "tab:blue", "tab:orange", "tab:green", "tab:brown", "tab:pink", "tab:olive")))


@dataclass
class Curve:
    """One line of an lr figure: a (row, setting) of Table 2 on one task.

    Attributes:
        label: The setting's name, e.g. ``"MELoRA n=2 r=8"``.
        row: Its Table 2 row (each n of MELoRA r=1 its own row).
        setting: Its setting within the row (``"n=2"``, ``"-"``).
        points: lr → (validation Cell, test Cell), ×100, over every seed run at that lr.
        chosen: The lr its row chose on validation, when the row chose this setting; else ``None``.
        best_of_n: The best-of-n row (MELoRA r=1) chose this setting and lr.
    """

    label: str
    row: str
    setting: str
    points: dict[float, tuple[Cell, Cell]]
    chosen: float | None = None
    best_of_n: bool = False

    def test_mean(self, lr: float) -> float:
        """The mean test-half metric at ``lr`` (NaN when a seed collapsed)."""
        return self.points[lr][1].mean


def _label(row: str, setting: str) -> str:
    if setting == "-" or "n=" in row:
        return row
    method, _, rank = row.partition(" ")
    return f"{method} {setting} {rank}"


def _curves(cells: dict, table: HeldoutTable, task: str) -> dict[str, Curve]:
    lines: dict[str, Curve] = {}
    for (t, row, setting, lr), pair in sorted(cells.items(), key=lambda item: (LINE_ROWS.index(item[0][1]), item[0][2], item[0][3])):
        if t != task:
            continue
        choice = table.rows.get(row, {}).get(task)
        label = _label(row, setting)
        curve = lines.setdefault(label, Curve(label, row, setting, {}, choice.lr if choice and choice.setting == setting else None))
        curve.points[lr] = pair
    best = table.rows.get(BEST_OF_N, {}).get(task)
    for curve in lines.values():
        curve.best_of_n = best is not None and curve.row in PER_N_ROWS and curve.setting == best.setting
    return lines


def _line_cells(records: list[dict], epochs: dict[str, int]) -> tuple[dict, HeldoutTable]:
    """The Table 2 cells of every line (the best-of-n row left out: it is one of the per-n lines) and the table."""
    cells, _ = protocol.layout_cells(records, TABLE2_VERDICTS, epochs)
    table = protocol.build(records, layout=TABLE2_VERDICTS, epochs=epochs)
    return {k: v for k, v in cells.items() if k[1] in LINE_ROWS}, table


def curves(records: list[dict], task: str, epochs: int | dict[str, int] | None = None) -> dict[str, Curve]:
    """Label → :class:`Curve` of each Table 2 setting on ``task`` at ``epochs`` (default: each task's fewest), in line order."""
    return _curves(*_line_cells(records, _epochs(records, epochs)), task)


def signs(above: Curve, below: Curve) -> dict[float, int]:
    """lr → 1, 0 or -1: whether ``above``'s mean test-half metric is above, level with or below ``below``'s there.

    Only the lrs both ran, means over the seeds both have at each; a collapsed mean ranks lowest and an lr where
    both collapsed (or that shares no seed) is left out.
    """
    found = {}
    for lr in sorted(set(above.points) & set(below.points)):
        a, b = above.points[lr][1], below.points[lr][1]
        seeds = set(a.seeds) & set(b.seeds)
        if not seeds:
            continue
        mean_a, mean_b = ranked(protocol.mean_on(a, seeds)), ranked(protocol.mean_on(b, seeds))
        if mean_a == mean_b == -math.inf:
            continue
        found[lr] = (mean_a > mean_b) - (mean_a < mean_b)
    return found


def compare(above: Curve, below: Curve) -> str:
    """Whether ``above``'s mean test-half metric is above ``below``'s at every lr both ran, below at every one, or neither.

    Returns:
        ``"above at every lr"``, ``"below at every lr"``, ``"crosses"`` (a tie counts as crossing), or ``"no common lr"``
        (:func:`signs` is empty).
    """
    return _side(signs(above, below))


def _side(by_lr: dict[float, int]) -> str:
    """:func:`compare`'s answer from :func:`signs`."""
    found = set(by_lr.values())
    if not found:
        return "no common lr"
    return "above at every lr" if found == {1} else "below at every lr" if found == {-1} else "crosses"


def _where(by_lr: dict[float, int]) -> str:
    """``"below at 1e-3, 3e-3; above at 1e-2"``: the side at each lr, from the smallest lr up, runs of one side joined."""
    runs: list[tuple[str, list[str]]] = []
    for lr, sign in sorted(by_lr.items()):
        side = {1: "above", 0: "level", -1: "below"}[sign]
        if runs and runs[-1][0] == side:
            runs[-1][1].append(lr_text(lr))
        else:
            runs.append((side, [lr_text(lr)]))
    return "; ".join(f"{side} at {', '.join(lrs)}" for side, lrs in runs)


def dominance(records: list[dict], task: str, row_a: str, row_b: str, epochs: int | dict[str, int] | None = None) -> str:
    """Whether line ``row_a`` (e.g. ``"MELoRA n=8 r=1"``) is above line ``row_b`` (``"LoRA r=8"``) on ``task`` at every lr.

    Returns:
        :func:`compare`'s answer; ``"no common lr"`` when either line has no runs.
    """
    lines = curves(records, task, epochs)
    if row_a not in lines or row_b not in lines:
        return "no common lr"
    return compare(lines[row_a], lines[row_b])


def dominance_text(lines: dict[str, Curve], reference: str = REFERENCE) -> str:
    """Each MELoRA line against ``reference`` in words.

    ``"MELoRA n=2 r=8 above LoRA r=8 at every lr; MELoRA n=2 r=1 crosses LoRA r=8 (below at 1e-3, 3e-3; above at 1e-2)"``.
    """
    if reference not in lines:
        return ""
    parts = []
    for label, curve in lines.items():
        by_lr = signs(curve, lines[reference]) if label.startswith("MELoRA") else {}
        verdict = _side(by_lr)
        if verdict == "crosses":
            parts.append(f"{label} crosses {reference} ({_where(by_lr)})")
        elif verdict != "no common lr":
            position, _, where = verdict.partition(" ")  # "above", "at every lr"
            parts.append(f"{label} {position} {reference} {where}")
    return "; ".join(parts)


def lr_figure(lines: dict[str, Curve], task: str, metric: str = "", floor: Floor | None = None) -> Figure | None:
    """The test-half metric ×100 against lr (log axis) on ``task``, one line per setting.

    Each line is the mean over seeds with its 95 % t interval as a band; its chosen lr (on validation)
    is a large filled marker (a star where the best-of-n row chose it); an lr where a seed collapsed is
    a cross at the bottom, not joined. Baselines other than LoRA are dashed. The caption says which
    MELoRA lines are above LoRA r=8 at every lr, and what a constant prediction scores (``floor``,
    :mod:`melora.experiments.report.chance`), drawn as a dotted line where it is near the curves.
    ``None`` when there are no lines.
    """
    if not lines:
        return None
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    all_lrs: set[float] = set()
    for label, curve in lines.items():
        colour = LINE_COLOURS.get(curve.row, "tab:grey")
        lrs = sorted(curve.points)
        all_lrs.update(lrs)
        finite = [lr for lr in lrs if math.isfinite(curve.test_mean(lr))]
        style = "--" if curve.row in BASELINES else "-"
        ax.plot(finite, [curve.test_mean(lr) for lr in finite], style, marker="o", markersize=4, color=colour, label=label)
        band = [(lr, ci) for lr in finite if (ci := curve.points[lr][1].ci95) is not None]
        if band:
            ax.fill_between([lr for lr, _ in band], [ci[0] for _, ci in band], [ci[1] for _, ci in band], color=colour, alpha=0.12, lw=0)
        collapsed = [lr for lr in lrs if lr not in finite]
        if collapsed:  # at the bottom of the axes: a collapsed metric has no value to plot
            ax.plot(collapsed, [0.03] * len(collapsed), "x", color=colour, markersize=9, markeredgewidth=2, clip_on=False,
                    transform=ax.get_xaxis_transform(), gid=f"collapsed:{label}")
        if curve.chosen in finite:
            marker, size = ("*", 15) if curve.best_of_n else ("o", 11)
            ax.plot([curve.chosen], [curve.test_mean(curve.chosen)], marker, markersize=size, color=colour, markeredgecolor="black",
                    linestyle="none", zorder=5, gid=f"chosen:{label}")
    if floor is not None:
        low, high = ax.get_ylim()
        if low - 0.25 * (high - low) <= floor.value <= high:  # further below, it would squash the curves
            ax.axhline(floor.value, color="black", linestyle=":", linewidth=1, gid="constant", label="constant prediction")
    ax.set_xscale("log")
    ticks = sorted(all_lrs)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([lr_text(lr) for lr in ticks])
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(f"test-half {METRIC_NAMES.get(metric, metric)} ×100".replace("  ", " "))
    ax.set_title(f"{GLUE_LABELS.get(task, task)}: test half against lr; mean over seeds, band: 95 % t interval over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", markersize=10, color="grey", markeredgecolor="black", linestyle="none",
                       label="lr chosen on validation"),
                Line2D([], [], marker="*", markersize=13, color="grey", markeredgecolor="black", linestyle="none",
                       label="also the best-of-n choice"),
                Line2D([], [], marker="x", markersize=8, markeredgewidth=2, color="grey", linestyle="none", label="a seed collapsed")]
    ax.legend(handles=handles, fontsize="x-small", loc="best")
    caption = dominance_text(lines)
    caption = f"At the lrs both ran (mean over common seeds): {caption}." if caption else ""
    if floor is not None:
        caption += f" A constant prediction ({floor.prediction}: the validation half's most frequent class) scores {floor.value:.1f}."
    fig.supxlabel(_wrap(caption.strip(), 120), fontsize=7)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def lr_rows(lines_by_task: dict[str, dict[str, Curve]]) -> tuple[list[str], list[list[str]]]:
    """The numbers behind every point of the lr figures: one line per (task, setting, lr).

    Columns: task, row, setting, lr, seeds, collapsed seeds, validation mean, test mean ± std, test 95 % CI, and
    'chosen' (``"yes"`` at the line's chosen lr, ``"yes (best n)"`` where the best-of-n row also chose it).
    """
    header = ["task", "row", "setting", "lr", "seeds", "collapsed seeds", "validation", "test mean ± std", "test 95% CI", "chosen"]
    body = []
    for task, lines in lines_by_task.items():
        for curve in lines.values():
            for lr in sorted(curve.points):
                validation, test = curve.points[lr]
                collapsed = sum(math.isnan(v) or math.isnan(t) for v, t in zip(validation.values, test.values))
                std = f" ± {test.std:.1f}" if test.std is not None else ""
                ci = test.ci95
                chosen = "—" if lr != curve.chosen else "yes (best n)" if curve.best_of_n else "yes"
                body.append([GLUE_LABELS.get(task, task), curve.row, curve.setting, lr_text(lr), str(test.n), str(collapsed),
                             f"{validation.mean:.1f}", f"{test.mean:.1f}{std}", f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "—", chosen])
    return header, body


LR_NOTE = (
    "The numbers behind the lr figures (figures/lr_sensitivity_<task>): dev-halves protocol, each Table 2 setting at every lr it "
    "ran. 'validation': mean validation-half metric ×100 over the seeds at that lr; 'test': test-half metric ×100, mean ± sample std "
    "and 95 % t interval over seeds (training randomness on one fixed test half, not the sampling of test data); 'collapsed seeds': "
    "runs that diverged or whose metric is undefined (their means are NaN). 'chosen': the lr the setting's row chose on the validation "
    "half ('best n': the MELoRA r=1 row chose this n too); the test half never chooses."
)


def tasks_of(records: list[dict]) -> list[str]:
    """The tasks of the dev-halves records in GLUE order."""
    present = {r["task"] for r in records if r.get("kind") == "glue" and selection_of(r) == DEV_HALVES.split and r.get("task")}
    return sorted(present, key=lambda t: GLUE_ORDER.index(t) if t in GLUE_ORDER else 99)


def metric_of(records: list[dict], task: str) -> str:
    """The task metric its records name (``""`` when none does)."""
    return next((r["metric"] for r in records if r.get("task") == task and r.get("metric")), "")


LR_SUMMARY_NOTE = (
    "Is the ranking the same at every learning rate? Each MELoRA line's mean test-half metric against LoRA r=8's at every lr "
    "both ran (dev-halves protocol, mean over the seeds the two share at that lr; means only: the intervals are in "
    "`results/tables/lr_sensitivity.md` and the bands of `results/figures/lr_sensitivity_<task>.png`):"
)


def lr_summary(lines_by_task: dict[str, dict[str, Curve]]) -> str:
    """One bullet per task with :func:`dominance_text`, under :data:`LR_SUMMARY_NOTE` (``""`` when no task has a line pair)."""
    bullets = [f"- {GLUE_LABELS.get(task, task)}: {words}." for task, lines in lines_by_task.items() if (words := dominance_text(lines))]
    return LR_SUMMARY_NOTE + "\n\n" + "\n".join(bullets) + "\n" if bullets else ""


def lr_sensitivity(records: list[dict], epochs: int | dict[str, int] | None = None,
                   found: dict[str, Floor] | None = None) -> tuple[dict[str, Figure], str, str, str]:
    """Every lr figure and their table, at ``epochs`` (default: each task's fewest).

    ``found``: each task's constant-prediction floor (:func:`~melora.experiments.report.chance.floors`,
    read from the records when not given).

    Returns:
        Task → its figure, the table as Markdown (with its note and each task's dominance line) and as CSV,
        and :func:`lr_summary` (the dominance lines alone, for the README).
    """
    cells, table = _line_cells(records, _epochs(records, epochs))
    lines_by_task = {task: lines for task in tasks_of(records) if (lines := _curves(cells, table, task))}
    found = floors(records) if found is None else found
    figures = {task: lr_figure(lines, task, metric_of(records, task), found.get(task)) for task, lines in lines_by_task.items()}
    header, body = lr_rows(lines_by_task)
    text = LR_NOTE + "".join(f" {GLUE_LABELS.get(task, task)}: {words}." for task, lines in lines_by_task.items()
                             if (words := dominance_text(lines)))
    if found:
        text += f" A constant prediction (the validation half's most frequent class) scores on the test half: {floors_in_words(found)}."
    return figures, protocol.markdown_table(header, body, text), protocol.csv_table(header, body), lr_summary(lines_by_task)


# ---- can the validation half make the choice? ---------------------------------------------------------------------

SIGNAL_NOTE = (
    "Can the validation half choose the learning rate? Each Table 2 line (dev-halves protocol) over the seeds every lr of it "
    "has: mean validation-half and test-half metric ×100 at each lr, the lr each half ranks first (ties to the smaller lr; "
    "the test half never chooses, it is shown only as a check), and the validation margin of the chosen lr over the "
    "runner-up with its standard error over seeds (paired by seed; '—' with one seed). {summary}"
)


def _signal_line(curve: Curve) -> list[str] | None:
    """One row of the signal table for ``curve``; ``None`` with fewer than two lrs or no seed that every lr has."""
    lrs = sorted(curve.points)
    seeds = set.intersection(*(set(curve.points[lr][0].seeds) for lr in lrs)) if lrs else set()
    if len(lrs) < 2 or not seeds:
        return None
    val = [ranked(protocol.mean_on(curve.points[lr][0], seeds)) for lr in lrs]
    test = [ranked(protocol.mean_on(curve.points[lr][1], seeds)) for lr in lrs]
    order = sorted(range(len(lrs)), key=lambda i: (-val[i], i))
    best, runner = order[0], order[1]
    test_best = min(range(len(lrs)), key=lambda i: (-test[i], i))
    by_seed = [{seed: v for v, seed in zip(curve.points[lrs[i]][0].values, curve.points[lrs[i]][0].seeds)} for i in (best, runner)]
    diffs = [by_seed[0][seed] - by_seed[1][seed] for seed in sorted(seeds)]
    margin = val[best] - val[runner]
    finite = all(math.isfinite(d) for d in diffs) and math.isfinite(margin)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if finite and len(diffs) > 1 else None

    def show(values: list[float]) -> str:
        return " / ".join(f"{v:.1f}" if math.isfinite(v) else "collapsed" for v in values)

    return [curve.label, str(len(seeds)), " / ".join(lr_text(lr) for lr in lrs), show(val), show(test), lr_text(lrs[best]),
            lr_text(lrs[test_best]), f"{margin:.1f}" if finite else "—", f"{se:.1f}" if se is not None else "—"]


def selection_signal(records: list[dict], epochs: int | dict[str, int] | None = None) -> tuple[str, str] | None:
    """The signal table as Markdown (with its note) and CSV; ``None`` when no line has two lrs."""
    cells, table = _line_cells(records, _epochs(records, epochs))
    header = ["task", "line", "seeds", "lrs", "validation", "test", "validation picks", "test would pick", "margin", "margin s.e."]
    body = [[GLUE_LABELS.get(task, task), *line] for task in tasks_of(records)
            for curve in _curves(cells, table, task).values() if (line := _signal_line(curve))]
    if not body:
        return None
    agree = sum(b[6] == b[7] for b in body)
    resolved = [b for b in body if b[9] != "—"]
    clear = sum(float(b[8]) > 2 * float(b[9]) for b in resolved)
    summary = (f"The validation half ranks first the lr the test half ranks first in {agree} of {len(body)} lines; its margin "
               f"exceeds twice its standard error in {clear} of the {len(resolved)} lines with two or more seeds (a rough check: "
               f"with few seeds the standard error is itself uncertain).")
    note = SIGNAL_NOTE.format(summary=summary)
    return protocol.markdown_table(header, body, note), protocol.csv_table(header, body)


# ---- longer training -----------------------------------------------------------------------------------------------

LONG_NOTE = (
    "Longer training: LoRA r=8 and MELoRA r=1 after {factor}x the default epochs, beside the default epochs (dev-halves protocol). "
    "MELoRA r=1 keeps the n chosen at the default epochs; each line's lr is chosen on the validation half among the lrs run at its "
    "epochs, the test half is reported. Intervals: 95 % t intervals over seeds (training randomness on one fixed test half, not the "
    "sampling of test data); Δ: paired over common seeds against LoRA r=8 at the same epochs, each at its own chosen lr; "
    "'better'/'worse' only when the paired interval excludes 0."
)


def long_epochs(records: list[dict], epochs: int | dict[str, int] | None = None, factor: int = LONG_FACTOR,
                tasks: tuple[str, ...] = LONG_TASKS) -> dict[str, int]:
    """Task → ``factor`` times its default epochs, for ``tasks``."""
    return {task: factor * e for task, e in _epochs(records, epochs).items() if task in tasks}


def long_rows(records: list[dict], epochs: int | dict[str, int] | None = None, factor: int = LONG_FACTOR,
              tasks: tuple[str, ...] = LONG_TASKS) -> tuple[list[str], list[list[str]]] | None:
    """LoRA r=8 and MELoRA r=1 at the default epochs and at ``factor`` times them, per task of ``tasks``.

    At the default epochs MELoRA r=1 is the best-of-n row; at the long epochs it is the row of the n
    chosen at the default epochs. Each line is at its own validation-chosen lr, with the paired Δ to
    LoRA r=8 at the same epochs.

    Returns:
        Header and body (columns: task, method, epochs, then :func:`~melora.experiments.report.protocol.choice_columns`'s),
        or ``None`` when no run of ``tasks`` trained for the long epochs.
    """
    default = {task: e for task, e in _epochs(records, epochs).items() if task in tasks}
    longer = long_epochs(records, epochs, factor, tasks)
    short = protocol.build(records, list(tasks), TABLE2_VERDICTS, default)
    long = protocol.build(records, list(tasks), TABLE2_VERDICTS, longer)
    body = []
    for task in tasks:
        best = short.rows.get(BEST_OF_N, {}).get(task)
        melora_long = f"MELoRA {best.setting} r=1" if best is not None else None  # the n chosen at the default epochs
        lines = [(REFERENCE, default.get(task), short.rows.get(REFERENCE, {}).get(task)), (BEST_OF_N, default.get(task), best),
                 (REFERENCE, longer.get(task), long.rows.get(REFERENCE, {}).get(task)),
                 (melora_long, longer.get(task), long.rows.get(melora_long, {}).get(task))]
        if lines[2][2] is None and lines[3][2] is None:
            continue
        body += [[GLUE_LABELS.get(task, task), row, str(e), *choice_columns(c, DEV_HALVES, row == REFERENCE)]
                 for row, e, c in lines if c is not None]
    return (["task", "method", "epochs", *choice_header(DEV_HALVES, REFERENCE)], body) if body else None


def long_note(factor: int = LONG_FACTOR) -> str:
    """The paragraph above the longer-training table."""
    return LONG_NOTE.format(factor=factor)
