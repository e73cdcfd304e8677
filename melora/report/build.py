"""Every table and figure for one runs folder: what ``scripts/make_results.py`` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from melora.report.figures import FIGURES, heldout_sweep_rows, save_figure
from melora.report.paper import TABLES
from melora.report.records import load_records, selection_of
from melora.report.render import to_markdown, write_table

ARTIFACTS = ("table2", "table3", "table4", "table5", "figure3", "figure4", "figure5")
# Written only when asked for (``make demo``; ``make results``: the records; ``make scaling-study``:
# the scaling study, from its own runs folder), except heldout (the held-out protocol's
# Tables 2 and 4, verdicts, Figures 4-5), which every full build writes.
EXTRAS = ("demo", "runs", "heldout", "scaling")


def make_results(runs: str | Path, out: str | Path, only: list[str] | None = None, model: str | None = None,
                 profile: str | None = None, selection: str = "dev", threshold: float = 0.1, log: Callable[[str], None] = print,
                 show: Callable[[str], None] | None = None) -> dict[str, list[Path]]:
    """Write ``<out>/tables/<table>.{md,csv,tex}`` and ``<out>/figures/<figure>.{png,pdf}``.

    ``only=["runs"]`` exports the run records without weights to
    ``<out>/runs/<runs folder name>`` (``melora.report.export``).

    An artifact with no records of its kind (e.g. Table 3 before any
    instruction-tuning run) is skipped with a message, not written empty.
    ``show`` receives each table's Markdown (``--print``).
    ``selection``: the tables and figures use the runs that chose their best
    epoch this way (``"dev"``: the paper's protocol; ``"heldout"``).

    Returns:
        Artifact name → files written.

    Raises:
        ValueError: an unknown artifact name, or records mixing models/profiles
            without ``model``/``profile`` to choose.
    """
    unknown = sorted(set(only or ()) - set(ARTIFACTS) - set(EXTRAS))
    if unknown:
        raise ValueError(f"unknown artifacts {unknown}; choose from {list(ARTIFACTS + EXTRAS)}")
    all_records = load_records(runs)
    records = [r for r in all_records if selection_of(r) == selection]
    written: dict[str, list[Path]] = {}
    if only is None or "heldout" in only:
        written.update(_heldout_table(all_records, Path(out) / "tables", model, log))
    if only is not None and "scaling" in only:
        from melora.report.protocol import SCALING_LAYOUTS

        written.update(_heldout_table(all_records, Path(out) / "tables", model, log, SCALING_LAYOUTS))
    for name in only or ARTIFACTS:
        if name in ("heldout", "scaling"):
            continue
        if name == "runs":  # the records without weights, e.g. results/runs/mini
            from melora.report.export import export_runs

            export_runs(runs, Path(out) / "runs" / Path(runs).name, log=log)
            written[name] = [Path(out) / "runs" / Path(runs).name]
            continue
        if name in TABLES:
            table = TABLES[name](records, model=model, profile=profile)
            if not any(c.n for r in table.rows for c in r.cells.values()) and not table.excluded:
                log(f"{name}: no matching runs in {runs}; skipped")
                continue
            written[name] = write_table(table, Path(out) / "tables")
            if show is not None:
                show(to_markdown(table))
        else:
            kwargs = {"threshold": threshold} if name == "figure3" else {}
            fig = FIGURES[name](records, model=model, profile=profile, **kwargs)
            if fig is None:
                log(f"{name}: no matching runs in {runs}; skipped")
                continue
            written[name] = save_figure(fig, Path(out) / "figures", name)
        log(f"{name}: " + ", ".join(str(p) for p in written[name]))
    return written


def _heldout_table(records: list[dict], folder: Path, model: str | None, log: Callable[[str], None],
                   layouts: tuple | None = None) -> dict[str, list[Path]]:
    """``table2_heldout`` and ``table4_heldout`` (``.md``, ``.csv``), their forest plots, and Figures 4–5 under
    held-out selection (``figure4_heldout``, ``figure5_heldout``), for the held-out runs there are.

    ``layouts=protocol.SCALING_LAYOUTS``: the scaling study's ``scaling`` and ``scaling_by_n`` tables,
    their forest plots and ``figures/scaling.{png,pdf}`` instead.
    """
    from melora.files import atomic_write_text
    from melora.report import protocol

    records = [r for r in records if selection_of(r) == "heldout" and (model is None or r.get("model") == model)]
    written: dict[str, list[Path]] = {}
    for layout in layouts or protocol.LAYOUTS:
        table = protocol.build(records, layout=layout)
        if not table.rows:
            continue
        kept = [r for r in records if layout.keep(r.get("method_config", {}))]
        models = sorted({str(r.get("model")) for r in kept})
        hardware = sorted({str((r.get("device") or {}).get("cpu") or (r.get("device") or {}).get("cuda")) for r in kept})
        in_rows = [r for r in kept if r.get("method_config") and layout.row(r["method_config"]) in layout.rows]
        note = (protocol.note(layout) + f" Model: {', '.join(models)}; hardware: {', '.join(hardware)}. "
                + protocol.data_note(in_rows))
        paths = [folder / f"{layout.name}.{ext}" for ext in ("md", "csv", "tex")]
        atomic_write_text(paths[0], protocol.to_markdown(table, note))
        atomic_write_text(paths[1], protocol.to_csv(table))
        atomic_write_text(paths[2], protocol.to_latex(table, note))
        log(f"{layout.name}: " + ", ".join(map(str, paths)))
        written[layout.name] = paths
        fig = protocol.forest_plot(table)
        if fig is not None:
            name = "verdicts" if layout is protocol.TABLE2 else f"verdicts_{layout.name.removesuffix('_heldout')}"
            written[name] = save_figure(fig, folder.parent / "figures", name)
            log(f"{name}: " + ", ".join(map(str, written[name])))
        if layout is protocol.SCALING and (fig := protocol.scaling_figure(table)) is not None:
            written["scaling_figure"] = save_figure(fig, folder.parent / "figures", "scaling")
            log("scaling: " + ", ".join(map(str, written["scaling_figure"])))
    if layouts is not None:  # the scaling study has no Figures 4-5
        return written
    for name, x, fixed in (("figure4", "n", (2, 4)), ("figure5", "r", (1, 2))):  # each point at the lr its validation metric chose
        fig = FIGURES[name](records, model=model, heldout=True)
        if fig is not None:
            written[f"{name}_heldout"] = save_figure(fig, folder.parent / "figures", f"{name}_heldout")
            header, body = heldout_sweep_rows(records, x, fixed, model=model)
            paths = [folder / f"{name}_heldout.md", folder / f"{name}_heldout.csv"]
            atomic_write_text(paths[0], protocol.markdown_table(header, body, FIGURE_NOTE.format(name=f"Figure {name[-1]}")))
            atomic_write_text(paths[1], protocol.csv_table(header, body))
            written[f"{name}_heldout"] += paths
            log(f"{name}_heldout: " + ", ".join(map(str, written[f"{name}_heldout"])))
    return written


FIGURE_NOTE = (
    "{name} under the held-out protocol: the numbers behind each point. Each (n, r) takes the lr its held-out "
    "metric chose (seed 0, grid {{3e-4, 1e-3, 3e-3}}); dev metric ×100 over the figure spec's seeds, mean ± sample std "
    "and 95 % t interval; Δ: paired over the same seeds against LoRA (n = 1) at the same r, each at its own lr; "
    "'better'/'worse' only when the interval excludes 0."
)
