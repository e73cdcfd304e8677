"""Tables as data: which runs each row and column take, and the aggregation over seeds.

A table is a list of ``RowSpec`` (which method settings, by the label of each record's method config) times a
list of ``Column`` (which records belong to the column and which number to take).
Each cell is the mean ± std over seeds of the completed runs that match both.
A row may choose among several settings, as the paper does for MELoRA's ``n``:

* ``pick="per_column"``: per column the setting with the best mean (Table 2's
  "MELoRA r=8 (best n)": the best n per task, by mean dev metric);
* ``pick="overall"``: one setting for the whole row, best by the mean of the
  ``by`` column (Table 3's LoRA rank, by held-out dev loss).

Runs that failed or did not finish are never averaged in; they are listed
under the table with their status and error.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from melora.experiments.report.records import completed, hardware, label_of, run_date, run_name
from melora.experiments.report.stats import Cell


@dataclass(frozen=True)
class Column:
    """One metric column.

    Attributes:
        key: Machine name (CSV headers).
        label: Header text.
        matches: Whether a record belongs to this column (e.g. its task).
        value: The column's number for a matching record (``None``: not available).
        size: Data-size text for the caption (e.g. ``"train 2000, dev 408"``).
        scale: Display factor (100: GLUE-style percentages).
        digits: Decimals shown.
        higher_is_better: Direction for best-setting selection.
        in_average: Whether the row average includes this column.
    """

    key: str
    label: str
    matches: Callable[[dict], bool]
    value: Callable[[dict], float | None]
    size: Callable[[dict], str | None] = lambda record: None
    scale: float = 100.0
    digits: int = 1
    higher_is_better: bool = True
    in_average: bool = True


@dataclass(frozen=True)
class RowSpec:
    """One row: the method setting(s) it reports.

    Attributes:
        label: Row name.
        settings: Candidate settings, by ``label_of`` (from each record's
            method config, e.g. ``"MELoRA n=8 r=1"``), in tie-break order.
        pick: ``"single"`` (``settings[0]``), ``"per_column"`` or ``"overall"``.
        by: The selection column for ``"overall"``.
        pick_names: Short names of the candidates shown next to a pick (``"n=4"``).
        group: Section label (Table 4's equivalent rank), ``""`` for none.
    """

    label: str
    settings: tuple[str, ...]
    pick: str = "single"
    by: Column | None = None
    pick_names: dict[str, str] = field(default_factory=dict)
    group: str = ""

    def __post_init__(self) -> None:
        if self.pick not in ("single", "per_column", "overall"):
            raise ValueError(f"row '{self.label}': pick must be single, per_column or overall, got {self.pick!r}")
        if self.pick == "overall" and self.by is None:
            raise ValueError(f"row '{self.label}': pick='overall' needs a `by` column")


@dataclass
class Row:
    spec: RowSpec
    cells: dict[str, Cell]
    params: list[int]
    average: float | None
    pick: str | None = None  # the setting an "overall" row chose

    @property
    def label(self) -> str:
        return self.spec.label


@dataclass
class Table:
    """A built table: rows of cells, plus everything needed to say where it came from."""

    name: str
    title: str
    columns: list[Column]
    rows: list[Row]
    caption: str
    excluded: list[str]
    notes: list[str]
    paper: dict[str, str]
    expected_seeds: int

    @property
    def has_groups(self) -> bool:
        return any(r.spec.group for r in self.rows)


def _values(records: list[dict], settings: set[str], columns: list[Column]):
    """``(setting, column key) → [(seed, value)]`` over completed runs, and the runs left out."""
    values: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    excluded, used = [], []
    for record in records:
        setting = label_of(record)
        if setting not in settings:
            continue
        cols = [c for c in columns if c.matches(record)]
        if not cols:
            continue
        if not completed(record):
            error = record.get("error")
            excluded.append(f"{run_name(record)}: {record.get('status', 'no status')}" + (f" ({error})" if error else "")
                            + f" [{record.get('run_dir', '')}]")
            continue
        missing = []
        for col in cols:
            value = col.value(record)
            if value is None:
                missing.append(col.label)
            else:
                values[(setting, col.key)].append((record.get("seed"), float(value)))
        if missing:
            why = f" ({record['eval_note']})" if record.get("eval_note") else ""
            excluded.append(f"{run_name(record)}: completed, but has no {', '.join(missing)} value{why} [{record.get('run_dir', '')}]")
        if len(missing) < len(cols):
            used.append(record)
    return values, excluded, used


def _cell(pairs: list[tuple[int, float]], pick: str | None = None) -> Cell:
    pairs = sorted(pairs, key=lambda p: (p[0] is None, p[0]))
    return Cell(values=[v for _, v in pairs], seeds=[s for s, _ in pairs], pick=pick)


def _best(candidates: dict[str, Cell], settings: tuple[str, ...], higher_is_better: bool) -> str | None:
    scored = [(name, candidates[name].mean) for name in settings if name in candidates and candidates[name].n]
    if not scored:
        return None
    sign = 1 if higher_is_better else -1
    # max() keeps the first of equals: ties go to the earlier setting (e.g. the smaller n).
    return max(scored, key=lambda tv: sign * tv[1])[0]


def build_rows(records: list[dict], specs: list[RowSpec], columns: list[Column]):
    """Aggregate ``records`` into rows; returns ``(rows, excluded, used records)``."""
    criteria = [s.by for s in specs if s.by is not None and s.by.key not in {c.key for c in columns}]
    all_columns = columns + list({c.key: c for c in criteria}.values())
    settings = {t for s in specs for t in s.settings}
    values, excluded, used = _values(records, settings, all_columns)
    params: dict[str, set[int]] = defaultdict(set)
    for record in used:
        if record.get("adapter_params") is not None:
            params[label_of(record)].add(int(record["adapter_params"]))

    rows = []
    for spec in specs:
        cells, chosen, pick = {}, set(), None
        if spec.pick == "overall":
            by = {t: _cell(values.get((t, spec.by.key), [])) for t in spec.settings}
            pick = _best(by, spec.settings, spec.by.higher_is_better)
        for col in columns:
            if spec.pick == "per_column":
                candidates = {t: _cell(values.get((t, col.key), [])) for t in spec.settings}
                setting = _best(candidates, spec.settings, col.higher_is_better)
                cell = _cell(values.get((setting, col.key), []), pick=setting) if setting else Cell()
            else:
                setting = pick if spec.pick == "overall" else spec.settings[0]
                cell = _cell(values.get((setting, col.key), [])) if setting else Cell()
            if cell.n:
                chosen.add(setting)
            cells[col.key] = cell
        averaged = [cells[c.key].mean for c in columns if c.in_average]
        average = sum(averaged) / len(averaged) if averaged and all(m is not None for m in averaged) else None
        row_params = sorted({p for t in chosen for p in params.get(t, ())})
        rows.append(Row(spec=spec, cells=cells, params=row_params, average=average, pick=pick))
    return rows, sorted(set(excluded)), used


def _span(values: list) -> str:
    values = sorted(set(values))
    if not values:
        return "none"
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}–{values[-1]}"
    return ", ".join(str(v) for v in values)


def _wall_time(record: dict) -> float | None:
    """Training plus evaluation wall time of a record (instruct runs: their INSTRUCTEVAL too)."""
    parts = [p for p in (record.get("wall_time_s"), (record.get("eval") or {}).get("wall_time_s")) if p is not None]
    return float(sum(parts)) if parts else None


def _run_time(records: list[dict]) -> str:
    """The runs' summed wall time (what it costs to regenerate the table on this hardware)."""
    times = [t for r in records if (t := _wall_time(r)) is not None]
    if not times:
        return ""
    evaluated = " (training and evaluation)" if any(r.get("eval") for r in records) else ""
    return (f"Run time{evaluated}: {sum(times) / 60:.0f} min summed over {len(times)} runs "
            f"(median {statistics.median_high(times) / 60:.1f} min per run).")


def caption(records: list[dict], columns: list[Column], expected_seeds: int, metric_note: str, today: dt.date | None = None) -> str:
    """Model, profile, data sizes, seeds, hardware and dates of the runs behind a table."""
    if not records:
        return "No completed runs yet: every cell is empty."
    models = sorted({f"{r.get('model')} ({r.get('model_name_or_path')})" for r in records})
    profiles = sorted({str(r.get("profile")) for r in records})
    sizes = []
    for col in columns:
        texts = sorted({t for r in records if col.matches(r) and (t := col.size(r))})
        if texts:
            sizes.append(f"{col.label} {' / '.join(texts)}")
    seeds = [r.get("seed") for r in records if r.get("seed") is not None]
    dates = sorted(d for r in records if (d := run_date(r)))
    when = f"{dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "") if dates else "unknown"
    today = today or dt.date.today()
    parts = [
        f"Model: {', '.join(models)}; profile {', '.join(profiles)}.",
        f"Data (examples): {'; '.join(sizes)}." if sizes else "",
        f"Seeds: {_span(seeds)} ({expected_seeds} per cell at most).",
        metric_note,
        f"Hardware: {'; '.join(sorted({hardware(r) for r in records}))}.",
        f"Runs dated {when}; table generated {today.isoformat()} from {len(records)} run records.",
        _run_time(records),
    ]
    return " ".join(p for p in parts if p)
