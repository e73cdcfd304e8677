"""Every table and figure for one runs folder: what ``scripts/make_results.py`` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from melora.experiments.report.figures import FIGURES, heldout_sweep_rows, save_figure
from melora.experiments.report.paper import TABLES
from melora.experiments.report.records import load_records, selection_of
from melora.experiments.report.render import to_markdown, write_table

ARTIFACTS = ("table2", "table3", "table4", "table5", "figure3", "figure4", "figure5")
# Written only when asked for (``make demo``; ``make results``: the records; ``make scaling-study``:
# the scaling study, from its own runs folder), except heldout (the held-out protocol's
# Tables 2 and 4, verdicts, Figures 4-5) and verdicts (the dev-halves protocol's Tables 2 and 4,
# lr curves, longer training), which every full build writes.
EXTRAS = ("demo", "runs", "heldout", "scaling", "verdicts")
FULL_BUILD = ("heldout", "verdicts")  # the extras a build without ``only`` writes


def make_results(runs: str | Path, out: str | Path, only: list[str] | None = None, model: str | None = None,
                 profile: str | None = None, selection: str = "dev", threshold: float = 0.1, log: Callable[[str], None] = print,
                 show: Callable[[str], None] | None = None) -> dict[str, list[Path]]:
    """Write ``<out>/tables/<table>.{md,csv,tex}`` and ``<out>/figures/<figure>.{png,pdf}``.

    ``only=["runs"]`` exports the run records without weights to
    ``<out>/runs/<runs folder name>`` (``melora.experiments.report.export``).

    An artifact with no records of its kind (e.g. Table 3 before any
    instruction-tuning run) is skipped with a message, not written empty.
    ``show`` receives each table's Markdown (``--print``).
    ``selection``: the tables and figures use the runs that chose their best
    epoch this way (``"dev"``: the paper's protocol; ``"heldout"``). The
    ``heldout`` and ``verdicts`` extras read their own protocol's runs.

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
    extras = set(FULL_BUILD if only is None else only)
    if "heldout" in extras:
        written.update(_heldout_table(all_records, Path(out) / "tables", model, log))
    if "scaling" in extras:
        from melora.experiments.report.protocol import SCALING_LAYOUTS

        written.update(_heldout_table(all_records, Path(out) / "tables", model, log, SCALING_LAYOUTS))
    if "verdicts" in extras:
        written.update(_verdicts(all_records, Path(out), model, log))
    if extras & {"heldout", "verdicts"}:
        written.update(_headline(Path(out) / "tables", log, _verdict_seeds(all_records, profile)))
    for name in only or ARTIFACTS:
        if name in ("heldout", "scaling", "verdicts"):
            continue
        if name == "runs":  # the records without weights, e.g. results/runs/mini
            from melora.experiments.report.export import export_runs

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
    from melora.experiments.report import protocol
    from melora.files import atomic_write_text

    records = [r for r in records if selection_of(r) == "heldout" and (model is None or r.get("model") == model)]
    written: dict[str, list[Path]] = {}
    for layout in layouts or protocol.LAYOUTS:
        table = protocol.build(records, layout=layout)
        if not table.rows:
            continue
        kept = [r for r in records if layout.keep(r.get("method_config", {}))]
        in_rows = [r for r in kept if r.get("method_config") and layout.row(r["method_config"]) in layout.rows]
        note = protocol.note(layout) + _provenance(kept) + protocol.data_note(in_rows)
        figure = "verdicts" if layout is protocol.TABLE2 else f"verdicts_{layout.name.removesuffix('_heldout')}"
        written.update(_write_protocol_table(table, note, folder, figure, log))
        if layout is protocol.SCALING and (fig := protocol.scaling_figure(table)) is not None:
            written["scaling_figure"] = save_figure(fig, folder.parent / "figures", "scaling")
            log("scaling: " + ", ".join(map(str, written["scaling_figure"])))
    if layouts is not None:  # the scaling study has no Figures 4-5
        return written
    header, body = protocol.selection_signal_rows(records)
    if body:
        paths = [folder / "heldout_selection_signal.md", folder / "heldout_selection_signal.csv"]
        atomic_write_text(paths[0], protocol.markdown_table(header, body, protocol.SELECTION_SIGNAL_NOTE.format(seed=0)))
        atomic_write_text(paths[1], protocol.csv_table(header, body))
        written["heldout_selection_signal"] = paths
        log("heldout_selection_signal: " + ", ".join(map(str, paths)))
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


def _provenance(records: list[dict]) -> str:
    """`` Model: …; hardware: …. `` of a table's runs (between its note and its data note)."""
    models = sorted({str(r.get("model")) for r in records})
    hardware = sorted({str((r.get("device") or {}).get("cpu") or (r.get("device") or {}).get("cuda")) for r in records})
    return f" Model: {', '.join(models)}; hardware: {', '.join(hardware)}. "


def _write_protocol_table(table, note: str, folder: Path, figure: str, log: Callable[[str], None]) -> dict[str, list[Path]]:
    """``<folder>/<table name>.{md,csv,tex}`` of a held-out or dev-halves table and its forest plot ``figures/<figure>.{png,pdf}``.

    Returns:
        Table name (and figure name, when a row has a paired difference) → files written.
    """
    from melora.experiments.report import protocol
    from melora.files import atomic_write_text

    paths = [folder / f"{table.layout.name}.{ext}" for ext in ("md", "csv", "tex")]
    atomic_write_text(paths[0], protocol.to_markdown(table, note))
    atomic_write_text(paths[1], protocol.to_csv(table))
    atomic_write_text(paths[2], protocol.to_latex(table, note))
    log(f"{table.layout.name}: " + ", ".join(map(str, paths)))
    written = {table.layout.name: paths}
    fig = protocol.forest_plot(table)
    if fig is not None:
        written[figure] = save_figure(fig, folder.parent / "figures", figure)
        log(f"{figure}: " + ", ".join(map(str, written[figure])))
    return written


def _verdict_seeds(records: list[dict], profile: str | None) -> dict[str, int] | None:
    """Table 2 row → the seeds per cell its dev-halves spec runs at the records' profile (``None`` if unknown).

    The ``verdicts`` spec's rows (LoRA and MELoRA, with each n of MELoRA r=1 on its own) and the rows
    ``verdicts_baselines`` adds (DyLoRA, AdaLoRA, Delta-LoRA), each at its own spec's seeds.
    """
    from melora.experiments.report import protocol, verdicts
    from melora.experiments.specs import load_spec

    profiles = {r.get("profile") for r in records if selection_of(r) == "dev_halves"}
    profile = profile or (profiles.pop() if len(profiles) == 1 else None)
    if profile is None:
        return None
    wanted: dict[str, int] = {}
    for name in ("verdicts", "verdicts_baselines"):
        try:
            spec = load_spec(name)
        except FileNotFoundError:  # an installed package without the experiment specs
            return None
        seeds = spec["profiles"].get(profile, {}).get("seeds")
        for method in (m for group in spec["groups"] for m in group["methods"]) if seeds else ():
            config = _method_config(method)
            for row in (protocol.row_of(config), verdicts.per_n_row(config)):
                if row is not None:
                    wanted.setdefault(row, len(seeds))
    return wanted or None


def _method_config(overrides: list[str]) -> dict:
    """``["method=melora", "method.r=1", "method.n=8"]`` → ``{"method": "melora", "r": 1, "n": 8}``."""
    import yaml

    config = {}
    for override in overrides:
        key, _, value = override.partition("=")
        config[key.removeprefix("method.")] = yaml.safe_load(value)
    return config


def _headline(tables: Path, log: Callable[[str], None], wanted_seeds: dict[str, int] | None = None) -> dict[str, list[Path]]:
    """``tables/headline.md``: Table 2's verdicts as a method × task grid (:mod:`melora.experiments.report.headline`).

    ``wanted_seeds``: the seeds per cell of the dev-halves sweep; until every cell has them, the headline says it is provisional.
    """
    from melora.experiments.report.headline import headline
    from melora.files import atomic_write_text

    text = headline(tables, wanted_seeds)
    if text is None:
        log("headline: no Table 2 verdicts under either protocol; skipped")
        return {}
    atomic_write_text(tables / "headline.md", text)
    log(f"headline: {tables / 'headline.md'}")
    return {"headline": [tables / "headline.md"]}


def _verdicts(records: list[dict], out: Path, model: str | None, log: Callable[[str], None]) -> dict[str, list[Path]]:
    """The dev-halves report (:mod:`melora.experiments.report.verdicts`) from the dev-halves GLUE runs there are.

    ``tables/table{2,4}_verdicts.{md,csv,tex}`` with ``figures/table{2,4}_verdicts_forest.{png,pdf}``,
    ``figures/lr_sensitivity_<task>.{png,pdf}`` with ``tables/lr_sensitivity.{md,csv}`` and
    ``tables/lr_sensitivity_summary.md`` (each task's lines against LoRA r=8 in words, for the README),
    ``tables/devhalves_selection_signal.{md,csv}`` (whether the validation half can rank each line's lrs),
    ``tables/constant_prediction.{md,csv}`` (what predicting one class scores on each test half: the floor), and
    ``tables/verdicts_long.{md,csv}`` when runs trained for the longer epochs (else skipped with a message).

    Raises:
        ValueError: the runs hold several models and ``model`` does not choose one.
    """
    from melora.experiments.report import chance, protocol, verdicts
    from melora.experiments.report.records import single_value
    from melora.files import atomic_write_text

    records = [r for r in records if r.get("kind") == "glue" and selection_of(r) == "dev_halves"]
    if model is None and records:
        model = single_value(records, "model", "model")  # a choice never mixes models
    records = [r for r in records if r.get("model") == model]
    if not records:
        log("verdicts: no dev-halves runs" + (f" of {model}" if model else "") + "; skipped")
        return {}
    epochs = verdicts.default_epochs(records)
    tables, figures = out / "tables", out / "figures"
    written: dict[str, list[Path]] = {}
    for layout in verdicts.LAYOUTS:
        table = verdicts.build(records, layout, epochs)
        if not table.rows:
            log(f"{layout.name}: no dev-halves runs of its rows; skipped")
            continue
        kept = [r for r in records if layout.keep(r["method_config"]) and protocol.epochs_of(r) == epochs.get(r["task"])]
        in_rows = [r for r in kept if layout.row(r["method_config"]) in layout.rows]
        diverged = sum(bool(r.get("diverged")) for r in in_rows)
        note = (verdicts.note(layout) + _provenance(kept) + protocol.data_note(in_rows, protocol.DEV_HALVES_SIZES)
                + (f" Diverged runs (ranked lowest): {diverged}." if diverged else ""))
        written.update(_write_protocol_table(table, note, tables, f"{layout.name}_forest", log))
    found = chance.floors(records)
    lr_figures, markdown, csv, summary = verdicts.lr_sensitivity(records, epochs, found)
    for task, fig in lr_figures.items():
        name = f"lr_sensitivity_{task}"
        written[name] = save_figure(fig, figures, name)
        log(f"{name}: " + ", ".join(map(str, written[name])))
    if lr_figures:
        written["lr_sensitivity"] = [tables / "lr_sensitivity.md", tables / "lr_sensitivity.csv", tables / "lr_sensitivity_summary.md"]
        atomic_write_text(written["lr_sensitivity"][0], markdown)
        atomic_write_text(written["lr_sensitivity"][1], csv)
        atomic_write_text(written["lr_sensitivity"][2], summary)
        log("lr_sensitivity: " + ", ".join(map(str, written["lr_sensitivity"])))
    signal = verdicts.selection_signal(records, epochs)
    if signal is not None:
        written["devhalves_selection_signal"] = [tables / "devhalves_selection_signal.md", tables / "devhalves_selection_signal.csv"]
        for path, text in zip(written["devhalves_selection_signal"], signal):
            atomic_write_text(path, text)
        log("devhalves_selection_signal: " + ", ".join(map(str, written["devhalves_selection_signal"])))
    if found:
        rows = chance.floor_rows(found)
        written["constant_prediction"] = [tables / "constant_prediction.md", tables / "constant_prediction.csv"]
        atomic_write_text(written["constant_prediction"][0], protocol.markdown_table(*rows, chance.NOTE))
        atomic_write_text(written["constant_prediction"][1], protocol.csv_table(*rows))
        log("constant_prediction: " + ", ".join(map(str, written["constant_prediction"])))
    long = verdicts.long_rows(records, epochs)
    if long is None:
        log(f"verdicts_long: no run of {', '.join(verdicts.LONG_TASKS)} trained for {verdicts.LONG_FACTOR}x the default epochs; skipped")
        return written
    longer = verdicts.long_epochs(records, epochs)
    long_runs = [r for r in records if protocol.epochs_of(r) == longer.get(r["task"])
                 and verdicts.TABLE2_VERDICTS.row(r["method_config"]) in (protocol.REFERENCE, verdicts.BEST_OF_N)]
    text = verdicts.long_note() + " " + protocol.data_note(long_runs, protocol.DEV_HALVES_SIZES)
    written["verdicts_long"] = [tables / "verdicts_long.md", tables / "verdicts_long.csv"]
    atomic_write_text(written["verdicts_long"][0], protocol.markdown_table(*long, text))
    atomic_write_text(written["verdicts_long"][1], protocol.csv_table(*long))
    log("verdicts_long: " + ", ".join(map(str, written["verdicts_long"])))
    return written


FIGURE_NOTE = (
    "{name} under the held-out protocol: the numbers behind each point. Each (n, r) takes the lr its held-out "
    "metric chose (seed 0, grid {{3e-4, 1e-3, 3e-3}}); dev metric ×100 over the figure spec's seeds, mean ± sample std "
    "and 95 % t interval; Δ: paired over the same seeds against LoRA (n = 1) at the same r, each at its own lr; "
    "'better'/'worse' only when the interval excludes 0."
)
