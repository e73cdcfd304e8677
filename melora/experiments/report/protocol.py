"""The held-out protocol's Tables 2 and 4: selection on validation, dev reported, paired verdicts.

Every run of ``selection=heldout`` chose its best epoch on a held-out part of
its training data and recorded the GLUE dev metric at that epoch
(``best_metrics``). Here, per task and Table 2 row:

1. each setting of the row (a MELoRA row has one per ``n``) gets the learning
   rate whose mean *validation* metric over its seeds is highest;
2. the row's setting is the one with the highest mean validation metric at its
   chosen lr (the paper's best-``n``, but chosen without the dev set);
3. the reported cell is the *dev* metric of that (setting, lr) over its seeds:
   mean ± sample std and a 95 % t interval;
4. each compared row's paired difference to its reference row (Table 2: LoRA
   r=8; Table 4: LoRA at the same equivalent rank), over the same seeds (same
   data order and initialisation seed), gets a 95 % t interval and a verdict.

A :class:`Layout` says which rows a table holds and what each is paired with;
its :class:`Protocol` says which runs it reads and which metric it reports
(the dev-halves protocol's tables, :mod:`melora.experiments.report.verdicts`, reuse all of
this with the test half of the dev set in place of dev).

Rows and settings come from each record's ``method_config``, never from tags.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from melora.adapters import config_from_dict
from melora.experiments.report.bracket import Bracket, bracket, ranked
from melora.experiments.report.paper import GLUE_LABELS, GLUE_ORDER
from melora.experiments.report.records import selection_of
from melora.experiments.report.stats import Cell, PairedDifference, paired_difference

REFERENCE = "LoRA r=8"
ROW_ORDER = ("LoRA r=8", "DyLoRA r=8", "AdaLoRA r=8", "Delta-LoRA r=8", "MELoRA r=8", "MELoRA r=1")


@dataclass(frozen=True)
class Protocol:
    """A selection protocol: which runs a table reads and what it reports.

    Attributes:
        split: The runs' ``selection.split`` (``"heldout"``, ``"dev_halves"``).
        reported: Prefix of the reported metric in ``best_metrics``: ``""`` (the dev metric), ``"test_"`` (the test half's).
        reported_name: The reported metric in column headers (``"dev"``, ``"test"``).
        reported_label: The reported metric in figure axes (``"dev metric"``).
        title: The protocol in a figure title (``"held-out selection"``).
        brackets: The sweep brackets each setting's lr grid (``lr_bracket``): runs that diverged
            enter the choice as collapsed (ranked lowest), and tables name the grid tried and why
            a chosen lr at an edge stays there.
    """

    split: str
    reported: str
    reported_name: str
    reported_label: str
    title: str
    brackets: bool = False


HELDOUT = Protocol("heldout", "", "dev", "dev metric", "held-out selection")
DEV_HALVES = Protocol("dev_halves", "test_", "test", "test-half metric", "dev-halves selection", brackets=True)


@dataclass(frozen=True)
class Layout:
    """One held-out or dev-halves table: its rows in order, the row each is paired with, and which runs it reads.

    Attributes:
        name: File stem (``table2_heldout``) and figure suffix.
        rows: Row names (``row``) in display order; other rows are left out.
        references: Row → the row its paired difference is taken against.
        keep: Method config → whether the run belongs to this table (e.g. Table 4's MELoRA is ``n = 2`` only).
        row: Method config → its row (default :func:`row_of`: Table 2's rows).
        setting: Method config → what a row chooses among (default :func:`setting_of`: MELoRA's n).
        versus: What the paired differences are against, in words (default: the single reference row).
        remark: A sentence the table's note ends with.
        also: Method config → a second row the run also belongs to, or ``None`` (e.g. each n of
            MELoRA r=1 as a row of its own beside the row that chooses n).
        protocol: Which runs the table reads and what it reports (default: the held-out protocol).
    """

    name: str
    rows: tuple[str, ...]
    references: dict[str, str]
    keep: Callable[[dict], bool] = lambda method_config: True
    row: Callable[[dict], str] = lambda method_config: row_of(method_config)
    setting: Callable[[dict], str] = lambda method_config: setting_of(method_config)
    versus: str = ""
    remark: str = ""
    chooses_n: bool = True  # MELoRA rows choose their n (Table 2); False: every row is one setting
    also: Callable[[dict], str | None] | None = None
    protocol: Protocol = HELDOUT

    @property
    def single_reference(self) -> str | None:
        refs = set(self.references.values())
        return refs.pop() if len(refs) == 1 else None

    @property
    def against(self) -> str:
        return self.versus or self.single_reference or "LoRA at the same equivalent rank"


TABLE2 = Layout("table2_heldout", ROW_ORDER, {row: REFERENCE for row in ROW_ORDER[1:]})
# Table 4: LoRA r=R against MELoRA n=2, r=R/2 (the same equivalent rank R, half the parameters).
TABLE4 = Layout(
    "table4_heldout",
    ("LoRA r=4", "MELoRA r=2", "LoRA r=8", "MELoRA r=4", "LoRA r=16", "MELoRA r=8"),
    {"MELoRA r=2": "LoRA r=4", "MELoRA r=4": "LoRA r=8", "MELoRA r=8": "LoRA r=16"},
    keep=lambda mc: mc.get("method") == "lora" or (mc.get("method") == "melora" and mc.get("n") == 2),
    remark="Table 4: MELoRA has n = 2 (half LoRA's parameters at the same equivalent rank); n is not chosen.",
    chooses_n=False,
)
LAYOUTS = (TABLE2, TABLE4)

# The scaling study (experiments/scaling*.yaml): MELoRA r=1 at n in SCALING_N under the two scaling
# conventions, each (n, convention) its own row at its own validation-chosen lr; nothing else is chosen.
SCALING_N = (2, 8, 16)


def _scaling_row(n: int, scaling: str) -> str:
    return f"MELoRA n={n} r=1" + ("" if scaling == "per_mini" else f" ({scaling})")


def _is_scaling_run(mc: dict) -> bool:
    return (mc.get("method") == "melora" and mc.get("r") == 1 and mc.get("n") in SCALING_N
            and mc.get("scaling") in ("per_mini", "equivalent"))


_SCALING_COMMON = dict(
    rows=tuple(_scaling_row(n, s) for n in SCALING_N for s in ("per_mini", "equivalent")),
    keep=_is_scaling_run,
    row=lambda mc: _scaling_row(mc["n"], mc["scaling"]),
    setting=lambda mc: "-",
    chooses_n=False,
)
# Is it the convention? equivalent (s = alpha/(n r)) against per_mini (s = alpha/r) at the same n.
SCALING = Layout(
    "scaling", references={_scaling_row(n, "equivalent"): _scaling_row(n, "per_mini") for n in SCALING_N},
    versus="the per_mini row at the same n", **_SCALING_COMMON,
    remark="Scaling study: MELoRA r=1, s = alpha/r (per_mini, the official code's) or alpha/(n r) (equivalent); "
           "each (n, convention) row has its own lr, chosen on validation; Δ: equivalent − per_mini at the same n.",
)
# Does the fall with n persist within a convention? n = 8 and 16 against n = 2, same convention.
SCALING_BY_N = Layout(
    "scaling_by_n",
    references={_scaling_row(n, s): _scaling_row(SCALING_N[0], s) for n in SCALING_N[1:] for s in ("per_mini", "equivalent")},
    versus=f"n={SCALING_N[0]} of the same convention", **_SCALING_COMMON,
    remark=f"Scaling study: Δ is the row minus n={SCALING_N[0]} of the same scaling convention (the fall with n), "
           "each at its own validation-chosen lr.",
)
SCALING_LAYOUTS = (SCALING, SCALING_BY_N)


def row_of(method_config: dict) -> str:
    """The Table 2 row of a method config: method and rank per (mini) LoRA, e.g. ``"MELoRA r=1"``."""
    return config_from_dict(method_config).row_name()


def setting_of(method_config: dict) -> str:
    """What a row chooses among: ``"n=8"`` for MELoRA, ``"-"`` for a row of one setting."""
    return config_from_dict(method_config).choice_name()


@dataclass
class Choice:
    """One (row, task) cell of a held-out or dev-halves table.

    ``reported`` is the metric the table reports at the chosen (setting, lr): dev
    (held-out protocol) or the test half (dev-halves protocol), never used to choose.
    """

    setting: str
    lr: float
    validation: Cell
    reported: Cell
    candidates: int  # (setting, lr) pairs the choice was made among
    lrs_tried: int = 0  # learning rates with runs for the chosen setting: below the grid's size, the lr is provisional
    edge: str = ""  # "top" / "bottom": the chosen lr is the largest / smallest tried, so the grid may not bracket the best
    versus_reference: PairedDifference | None = None
    grid: tuple[float, ...] = ()  # the lrs tried for the chosen setting, ascending
    bracket: Bracket | None = None  # where the chosen setting's grid stands (None: its lrs share no seed)

    @property
    def dev(self) -> Cell:
        """The reported cell under its held-out name."""
        return self.reported


@dataclass
class HeldoutTable:
    tasks: list[str]
    rows: dict[str, dict[str, Choice]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    layout: Layout = TABLE2


def _scaled(value: float) -> float:
    return 100.0 * value


def epochs_of(record: dict) -> int | None:
    """The number of epochs a GLUE run trained for (``config.task.epochs``; ``None`` if its record lacks it)."""
    return ((record.get("config") or {}).get("task") or {}).get("epochs")


def collect(records: list[dict], row: Callable[[dict], str | None] = row_of, setting: Callable[[dict], str] = setting_of,
            protocol: Protocol = HELDOUT, epochs: dict[str, int] | None = None) -> tuple[dict, list[str]]:
    """``{(task, row, setting, lr): (validation Cell, reported Cell)}`` of one protocol's GLUE runs, and failed runs.

    ``row``, ``setting``: method config → its row (``None``: in no row) and setting (default: Table 2's).
    ``protocol``: whose runs, and which metric the reported Cell holds (default: held-out, dev).
    ``epochs``: task → the epochs a run must have trained for (default: any).
    Under a protocol that ``brackets``, a diverged run enters both Cells as NaN (collapsed: it ranks
    lowest); other failed runs are only listed.
    """
    cells: dict[tuple, tuple[Cell, Cell]] = defaultdict(lambda: (Cell(), Cell()))
    failed = []
    for r in records:
        if r.get("kind") != "glue" or selection_of(r) != protocol.split:
            continue
        if epochs is not None and epochs_of(r) != epochs.get(r.get("task")):
            continue
        collapsed = protocol.brackets and r.get("status") == "failed" and r.get("diverged")
        if r.get("status") != "completed" and not collapsed:
            if r.get("status") == "failed":
                failed.append(r.get("name", r.get("run_dir", "?")))
            continue
        mc = r["method_config"]
        if (row_name := row(mc)) is None:
            continue
        lr = float(r["config"]["task"]["lr"])
        validation, reported = cells[(r["task"], row_name, setting(mc), lr)]
        validation.values.append(math.nan if collapsed else _scaled(r["best_metric"]))
        validation.seeds.append(r["seed"])
        reported.values.append(math.nan if collapsed else _scaled(r["best_metrics"][protocol.reported + r["metric"]]))
        reported.seeds.append(r["seed"])
    return dict(cells), failed


def mean_on(cell: Cell, seeds: set) -> float:
    """The mean of ``cell`` over its values of ``seeds``."""
    values = [v for v, seed in zip(cell.values, cell.seeds) if seed in seeds]
    return sum(values) / len(values)


def choose(cells: dict, task: str, row: str) -> Choice | None:
    """The (setting, lr) of ``row`` on ``task`` with the highest mean validation metric.

    The lr is chosen per setting (:func:`melora.experiments.report.bracket.bracket`: the
    highest mean over the seeds every lr of the setting has, ties to the
    smaller lr, a collapsed run ranks lowest), then the setting at its chosen
    lr, over the seeds every finalist has; ties go to the first setting in
    sorted order. Seeds added later at the chosen lr cannot move the choice.
    The reported metric (dev, or the test half) is never looked at.
    """
    options = {(s, lr): c for (t, rw, s, lr), c in cells.items() if t == task and rw == row}
    if not options:
        return None

    def common(keys) -> set:
        seeds = set.intersection(*(set(options[k][0].seeds) for k in keys))
        return seeds or set.union(*(set(options[k][0].seeds) for k in keys))

    best_lr, brackets = {}, {}
    for setting in sorted({s for s, _ in options}):
        grid = sorted(lr for s, lr in options if s == setting)
        state = bracket({lr: dict(zip(options[(setting, lr)][0].seeds, options[(setting, lr)][0].values)) for lr in grid})
        if state.best_lr is None:  # no seed every lr has: each lr's own mean
            state = None
            best = max(grid, key=lambda lr: ranked(options[(setting, lr)][0].mean))
        else:
            best = state.best_lr
        best_lr[setting], brackets[setting] = best, state
    finalists = [(s, lr) for s, lr in best_lr.items()]
    seeds = common(finalists)
    setting, lr = max(finalists, key=lambda k: ranked(mean_on(options[k][0], seeds)))
    val, reported = options[(setting, lr)]
    tried = tuple(sorted(lr_ for s, lr_ in options if s == setting))
    edge = "" if len(tried) < 3 else "top" if lr == tried[-1] else "bottom" if lr == tried[0] else ""
    return Choice(setting=setting, lr=lr, validation=val, reported=reported, candidates=len(options), lrs_tried=len(tried),
                  edge=edge, grid=tried, bracket=brackets[setting])


def layout_cells(records: list[dict], layout: Layout, epochs: dict[str, int] | None = None) -> tuple[dict, list[str]]:
    """:func:`collect` for the runs and rows of ``layout`` (a run in an ``also`` row is in both of its rows).

    Returns:
        ``{(task, row, setting, lr): (validation Cell, reported Cell)}`` of ``layout.rows``, and the failed runs.
    """
    records = [r for r in records if "method_config" not in r or layout.keep(r["method_config"])]
    cells, failed = collect(records, layout.row, layout.setting, layout.protocol, epochs)
    if layout.also is not None:
        cells |= collect(records, layout.also, layout.setting, layout.protocol, epochs)[0]
    return {k: v for k, v in cells.items() if k[1] in layout.rows}, failed


def build(records: list[dict], tasks: list[str] | None = None, layout: Layout = TABLE2,
          epochs: dict[str, int] | None = None) -> HeldoutTable:
    """The table ``layout`` from run records (other rows' runs, and other protocols', are ignored).

    ``epochs``: task → the epochs its runs must have trained for (default: any).
    """
    cells, failed = layout_cells(records, layout, epochs)
    present = {t for (t, *_rest) in cells}
    tasks = tasks or sorted(present, key=lambda t: GLUE_ORDER.index(t) if t in GLUE_ORDER else 99)
    table = HeldoutTable(tasks=tasks, failed=failed, layout=layout)
    rows = sorted({rw for (_, rw, _, _) in cells}, key=layout.rows.index)
    for row in rows:
        table.rows[row] = {t: c for t in tasks if (c := choose(cells, t, row)) is not None}
    for row, by_task in table.rows.items():
        reference = layout.references.get(row)
        if reference is None:
            continue
        for task, choice in by_task.items():
            ref = table.rows.get(reference, {}).get(task)
            if ref is not None:
                choice.versus_reference = paired_difference(choice.reported, ref.reported)
    return table


def _interval(ci) -> str:
    return f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "—"


def lr_text(lr: float) -> str:
    """A learning rate as the specs write it: ``1e-3``, ``3e-2``, ``2.5e-4``."""
    mantissa, _, exponent = f"{lr:e}".partition("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def grid_text(choice: Choice) -> str:
    """The lrs tried for the chosen setting, ascending, marking those whose mean collapsed: ``1e-3, 3e-3, 1e-2, 3e-2 (collapsed)``."""
    means = choice.bracket.means if choice.bracket is not None else {}
    return ", ".join(lr_text(lr) + (" (collapsed)" if means.get(lr) == -math.inf else "") for lr in choice.grid)


EDGE_REASONS = {"limit": "grid limit", "flat": "flat", "extend": "still being extended"}


def edge_text(choice: Choice) -> str:
    """Whether the chosen lr sits at an edge of its grid, and the bracket's reason: ``"top: grid limit"``, ``"—"`` (interior)."""
    if not choice.edge:
        return "—"
    reason = EDGE_REASONS.get(choice.bracket.status) if choice.bracket is not None else None
    return f"{choice.edge}: {reason}" if reason else choice.edge


def choice_header(protocol: Protocol, reference: str | None) -> list[str]:
    """The headers of :func:`choice_columns`; ``reference``: the one row every Δ is against (``None``: several)."""
    reported = protocol.reported_name
    return ["chosen", "lr", "lr at grid edge", "lrs tried", "seeds", "validation", f"{reported} mean ± std", f"{reported} 95% CI",
            f"Δ vs {reference} (paired)" if reference else "Δ vs reference (paired)", "Δ 95% CI", "verdict"]


def choice_columns(c: Choice, protocol: Protocol, is_reference: bool) -> list[str]:
    """One cell's columns: chosen setting, lr, edge, lrs tried, seeds, validation, reported mean ± std and CI, Δ, its CI, verdict.

    Under a protocol that ``brackets``, 'lrs tried' lists the grid and 'lr at grid edge' gives the bracket's reason.
    ``is_reference``: the row is another's reference (its verdict column says so).
    """
    std = f" ± {c.reported.std:.1f}" if c.reported.std is not None else ""
    d = c.versus_reference
    if protocol.brackets:
        lr, edge, tried = lr_text(c.lr), edge_text(c), grid_text(c)
    else:
        lr, edge, tried = f"{c.lr:g}", c.edge or "—", str(c.lrs_tried)
    return [c.setting, lr, edge, tried, str(c.reported.n), f"{c.validation.mean:.1f}",
            f"{c.reported.mean:.1f}{std}", _interval(c.reported.ci95),
            f"{d.mean:+.1f}" if d and d.mean is not None else "—", _interval(d.ci) if d else "—",
            d.verdict if d else ("reference" if is_reference else "—")]


def to_rows(table: HeldoutTable) -> tuple[list[str], list[list[str]]]:
    """Header and body of the long-format table: one line per (row, task) (columns: :func:`choice_columns`)."""
    layout, single = table.layout, table.layout.single_reference
    header = ["method", "task", *choice_header(layout.protocol, single)]
    drop_chosen = not layout.chooses_n and all(c.setting == "-" for by_task in table.rows.values() for c in by_task.values())
    if drop_chosen:
        header.remove("chosen")  # one setting per row: nothing is chosen but the lr
    if not single:
        header.insert(-3, "reference")
    body = []
    for row, by_task in table.rows.items():
        for task in table.tasks:
            c = by_task.get(task)
            if c is None:
                continue
            line = [row, GLUE_LABELS.get(task, task), *choice_columns(c, layout.protocol, row in layout.references.values())]
            if not single:
                line.insert(-3, layout.references.get(row, "—"))
            if drop_chosen:
                del line[2]
            body.append(line)
    return header, body


def markdown_table(header: list[str], body: list[list[str]], note: str = "") -> str:
    """``note``, a blank line, then a Markdown table of ``header`` and ``body``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return (note + "\n\n" if note else "") + "\n".join(lines) + "\n"


def csv_table(header: list[str], body: list[list[str]]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(body)
    return out.getvalue()


def to_markdown(table: HeldoutTable, note: str = "") -> str:
    text = markdown_table(*to_rows(table), note)
    return text + (f"\nFailed runs: {', '.join(table.failed)}\n" if table.failed else "")


def to_csv(table: HeldoutTable) -> str:
    return csv_table(*to_rows(table))


def note(layout: Layout) -> str:
    """The paragraph above a held-out table: how every number in it was chosen."""
    against = layout.against + ("" if layout.single_reference or layout.versus else " (the 'reference' column)")
    text = NOTE.replace("against LoRA r=8 at its own chosen lr", f"against {against} at its own chosen lr")
    if not layout.chooses_n:
        text = text.replace("the lr of each setting, then MELoRA's n, are chosen", "the lr of each row is chosen")
        text = text.replace("; MELoRA rows also choose n, which 'chosen' names", "; nothing else is chosen")
    return text + (f" {layout.remark}" if layout.remark else "")


NOTE = (
    "Held-out protocol. Each run picks its best epoch on a fixed held-out 10 % (≥ 200 examples) of its "
    "training subset; the lr of each setting, then MELoRA's n, are chosen by the mean held-out metric over seeds "
    "('validation', ×100); 'dev' is the GLUE dev metric ×100 at the chosen epoch, never used to choose. "
    "CI: 95 % t interval over seeds; Δ: paired over common seeds against LoRA r=8 at its own chosen lr. "
    "Verdict 'better'/'worse' only when the paired CI excludes 0. Tuning budget: every row the same lr grid; "
    "MELoRA rows also choose n, which 'chosen' names. 'lrs tried': learning rates with runs for that setting; "
    "below the grid's three the lr is provisional; 'lr at grid edge': the chosen lr is the grid's largest (top) or "
    "smallest (bottom), so a wider grid might choose another. 'too few seeds': under two paired seeds."
)


def forest_plot(table: HeldoutTable):
    """Each row's paired difference to its reference row per task, with its 95 % CI (a point alone: one seed).

    Returns a matplotlib Figure, or ``None`` when no row has a paired difference.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [(row, task, c.versus_reference) for row, by_task in table.rows.items() for task, c in by_task.items()
             if c.versus_reference is not None and c.versus_reference.mean is not None]
    if not lines:
        return None
    refs = table.layout.references
    single = table.layout.single_reference

    def label(row: str, task: str, d) -> str:
        versus = "" if single else f" − {refs[row]}"
        return f"{row}{versus} · {GLUE_LABELS.get(task, task)} ({len(d.seeds)} seed{'s' if len(d.seeds) != 1 else ''})"

    labels = [label(row, task, d) for row, task, d in reversed(lines)]
    # Sized to the row labels (about 0.075 in a character at 10 pt), so long ones do not squeeze the axes;
    # the title and axis label wrap to the axes' width (about 0.062 in a character at 9 pt).
    label_in = 0.075 * max(map(len, labels))
    width = max(8.5, label_in + 4.5)
    columns = max(40, int((width - label_in - 0.5) / 0.062))
    fig, ax = plt.subplots(figsize=(width, 0.32 * len(lines) + 1.6))
    colours = {"better": "tab:green", "worse": "tab:red"}
    for y, (row, task, d) in enumerate(reversed(lines)):
        colour = colours.get(d.verdict, "tab:grey")
        if d.ci is not None:
            ax.plot(d.ci, [y, y], color=colour, lw=2)
        ax.plot([d.mean], [y], "o", color=colour)
    ax.set_yticks(range(len(lines)), labels)
    ax.axvline(0, color="black", lw=0.8)
    versus = table.layout.against
    protocol = table.layout.protocol
    interval = "95\u00a0%\u00a0t\u00a0CI over seeds"  # no break inside "95 % t CI"
    ax.set_xlabel(textwrap.fill(f"{protocol.reported_label} ×100: paired difference to {versus}, {interval}", columns), fontsize=9)
    ax.set_title(textwrap.fill(f"{protocol.title}; green: better, red: worse, grey: no detectable difference", columns), fontsize=9)
    fig.tight_layout()
    return fig


def scaling_figure(table: HeldoutTable):
    """The scaling study at a glance: dev metric against n per convention, one panel per task.

    Each point is a (n, convention) row at its validation-chosen lr (written beside it): the
    mean over seeds with its 95 % t interval (no bar: one seed). ``None`` when the table is empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not table.rows:
        return None
    fig, axes = plt.subplots(1, len(table.tasks), figsize=(4.2 * len(table.tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], table.tasks):
        for offset, (scaling, colour) in zip((-0.04, 0.04), (("per_mini", "tab:blue"), ("equivalent", "tab:orange"))):
            points = [(n, table.rows[row][task]) for n in SCALING_N
                      if task in table.rows.get(row := _scaling_row(n, scaling), {})]
            if not points:
                continue
            xs = [n * 2 ** offset for n, _ in points]  # side by side on the log axis
            means = [c.dev.mean for _, c in points]
            err = [[c.dev.mean - c.dev.ci95[0] if c.dev.ci95 else 0 for _, c in points],
                   [c.dev.ci95[1] - c.dev.mean if c.dev.ci95 else 0 for _, c in points]]
            label = "s = α/r (per_mini)" if scaling == "per_mini" else "s = α/(n·r) (equivalent)"
            ax.errorbar(xs, means, yerr=err, marker="o", capsize=3, color=colour, label=label)
            for x, (_, c) in zip(xs, points):
                ax.annotate(f"{c.lr:g}", (x, c.dev.mean), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(SCALING_N), [str(n) for n in SCALING_N])
        ax.minorticks_off()
        ax.set_title(GLUE_LABELS.get(task, task))
        ax.set_xlabel("n (mini LoRAs of rank r = 1)")
        ax.set_ylabel("dev metric ×100")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    seeds = sorted({s for by_task in table.rows.values() for c in by_task.values() for s in c.dev.seeds})
    fig.suptitle("Scaling study: MELoRA r=1, held-out selection, each point at its own chosen lr (labels); "
                 f"95 % t CI over seeds {', '.join(map(str, seeds))}", fontsize=9)
    fig.tight_layout()
    return fig


HELDOUT_SIZES = (("heldout", "held-out"), ("validation", "dev"))
DEV_HALVES_SIZES = (("val", "validation half"), ("test", "test half"))


def data_note(records: list[dict], evaluated: tuple[tuple[str, str], ...] = HELDOUT_SIZES) -> str:
    """Per task: training examples, the evaluated sets' sizes and epochs; and the seeds.

    ``evaluated``: ``(eval_sizes key, name)`` of each evaluated set (default: the held-out split, after
    which the training examples are counted, and dev; :data:`DEV_HALVES_SIZES`: the dev halves).
    A size a record lacks (records from before the split existed) shows as ``None``.
    """
    sizes: dict[str, set] = defaultdict(set)
    seeds = set()
    for r in records:
        if r.get("status") != "completed":
            continue
        evals, task = r.get("eval_sizes") or {}, r.get("task")
        sizes[task].add((r.get("train_size"), *(evals.get(key) for key, _ in evaluated), epochs_of(r)))
        seeds.add(r.get("seed"))
    order = sorted(sizes, key=lambda t: GLUE_ORDER.index(t) if t in GLUE_ORDER else 99)

    def one(task: str) -> str:
        parts = [", ".join([f"train {train}", *(f"{name} {size}" for (_, name), size in zip(evaluated, rest)), f"{epochs} epochs"])
                 for train, *rest, epochs in sorted(sizes[task], key=str)]
        return f"{GLUE_LABELS.get(task, task)} " + " / ".join(parts)

    return ("Data (examples): " + "; ".join(one(t) for t in order) + f". Seeds: {', '.join(map(str, sorted(seeds, key=str)))}."
            if order else "")


def to_latex(table: HeldoutTable, note: str = "") -> str:
    """The long-format table as a LaTeX ``table*`` (booktabs), the note as its caption."""
    from melora.experiments.report.render import latex_escape

    header, body = to_rows(table)
    lines = [f"% {table.layout.name}: generated by scripts/make_results.py from run records; do not edit.",
             r"\begin{table*}[t]", r"\centering", r"\scriptsize", rf"\begin{{tabular}}{{ll{'r' * (len(header) - 2)}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in body]
    failed = f" Failed runs: {', '.join(table.failed)}." if table.failed else ""
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(note)}{latex_escape(failed)}}}",
              rf"\label{{tab:{table.layout.name.replace('_', '-')}}}", r"\end{table*}"]
    return "\n".join(lines) + "\n"


def selection_signal_rows(records: list[dict], seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Why held-out selection was superseded: per task and setting, the dev and the held-out metric at each lr of one seed.

    For each (task, setting) of the held-out records at ``seed``: the learning rates, the GLUE dev
    metric ×100 and the held-out metric ×100 at each, the lr each of the two would pick (highest;
    ties to the smaller lr) and each metric's spread over the grid (max − min). A held-out split
    whose spread is small next to dev's cannot rank the learning rates that dev tells apart.
    Returns ``(header, body)``.
    """
    by_setting: dict[tuple, dict[float, tuple[float, float]]] = defaultdict(dict)
    for r in records:
        if r.get("kind") != "glue" or selection_of(r) != "heldout" or r.get("status") != "completed" or r.get("seed") != seed:
            continue
        mc = r.get("method_config") or {}
        metric = r["metric"]
        key = (r["task"], config_from_dict(mc).label())
        by_setting[key][float(r["config"]["task"]["lr"])] = (_scaled(r["best_metrics"][metric]), _scaled(r["best_metric"]))
    header = ["task", "setting", "lrs", "dev", "held-out", "held-out picks", "dev would pick", "dev spread", "held-out spread"]
    body = []
    order = sorted(by_setting, key=lambda k: (GLUE_ORDER.index(k[0]) if k[0] in GLUE_ORDER else 99, k[1]))
    for task, label in order:
        points = by_setting[(task, label)]
        lrs = sorted(points)
        if len(lrs) < 2:
            continue
        dev, held = [points[lr][0] for lr in lrs], [points[lr][1] for lr in lrs]

        def pick(values: list[float]) -> str:
            return f"{lrs[max(range(len(lrs)), key=lambda i: (values[i], -i))]:g}"

        body.append([GLUE_LABELS.get(task, task), label, " / ".join(f"{lr:g}" for lr in lrs), " / ".join(f"{v:.1f}" for v in dev),
                     " / ".join(f"{v:.1f}" for v in held), pick(held), pick(dev), f"{max(dev) - min(dev):.1f}", f"{max(held) - min(held):.1f}"])
    return header, body


SELECTION_SIGNAL_NOTE = (
    "Why the held-out protocol was superseded (seed {seed}, every setting with a learning-rate grid). Held-out selection chose "
    "each run's epoch and each row's lr on a split of the training subset; 'dev' is the GLUE dev metric ×100, 'held-out' "
    "the selection metric ×100, at each lr. Where the held-out spread over the grid is small next to dev's, or the two pick "
    "different learning rates, the selection signal cannot make the choice the reported metric depends on. The dev-halves "
    "protocol (table2_verdicts) selects on half of the dev set instead and reports the other half."
)
