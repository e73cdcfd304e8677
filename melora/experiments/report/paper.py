"""The paper's Tables 2–5: their rows, columns and the place for the paper's own numbers.

Columns follow the experiment spec (``experiments/<table>.yaml``) at the profile
of the records: the paper's eight GLUE tasks at ``paper``, the tasks available
offline at ``mini``. Instruction-tuning tables read benchmark scores through
``BENCHMARKS`` (benchmark → dotted path into ``eval_record.json``), so the
evaluation record's layout is wired in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from melora.experiments.report.records import BASE_TAG, lookup, scope
from melora.experiments.report.tables import Column, RowSpec, Table, build_rows, caption

NOT_AVAILABLE = "n/a (not available offline; see MELORA.md)"

# The paper's values, keyed by table and row label (e.g. {"table2": {"LoRA r=8": "…"}}).
# Deliberately empty: only the abstract is reachable from this workplace, and no
# number is to be typed from memory. Every "Paper" cell therefore reads NOT_AVAILABLE.
PAPER_NUMBERS: dict[str, dict[str, str]] = {}

GLUE_ORDER = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")
GLUE_LABELS = {"mnli": "MNLI", "sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "qnli": "QNLI", "qqp": "QQP", "rte": "RTE", "stsb": "STS-B"}
METRIC_NAMES = {"accuracy": "accuracy", "matthews_correlation": "Matthews corr.", "pearson": "Pearson corr.", "f1": "F1", "spearmanr": "Spearman corr."}


@dataclass(frozen=True)
class Benchmark:
    """An INSTRUCTEVAL benchmark column: where its score and size sit in ``eval_record.json``."""

    key: str
    label: str
    metric: str
    score_path: str
    size_path: str | None = None


# Paths follow melora.experiments.instructeval.harness.evaluate_all's return value
# ({"scores": {task: fraction}, "results": {task: {"n_examples": …}}}).
BENCHMARKS = (
    Benchmark("mmlu", "MMLU", "5-shot accuracy", "scores.mmlu", "results.mmlu.n_examples"),
    Benchmark("bbh", "BBH", "3-shot exact match", "scores.bbh", "results.bbh.n_examples"),
    Benchmark("drop", "DROP", "3-shot F1", "scores.drop", "results.drop.n_examples"),
    Benchmark("humaneval", "HumanEval", "0-shot pass@1", "scores.humaneval", "results.humaneval.n_examples"),
)


def spec_tasks(spec_name: str, profile: str) -> list[str] | None:
    """The GLUE tasks ``experiments/<spec_name>.yaml`` runs at ``profile`` (``None``: no such spec/profile)."""
    from melora.experiments.specs import load_spec

    try:
        spec = load_spec(spec_name)
    except FileNotFoundError:
        return None
    prof = spec.get("profiles", {}).get(profile)
    if prof is None:
        return None
    tasks = prof.get("tasks") or [t for g in spec.get("groups", []) for t in g.get("tasks", [])]
    return list(dict.fromkeys(t.split("/")[-1] for t in tasks))


def spec_seeds(spec_name: str, profile: str) -> list[int] | None:
    """The seeds ``experiments/<spec_name>.yaml`` runs at ``profile`` (``None``: no such spec/profile)."""
    from melora.experiments.specs import load_spec

    try:
        return list(load_spec(spec_name)["profiles"][profile]["seeds"])
    except (FileNotFoundError, KeyError):
        return None


def glue_column(task: str) -> Column:
    def size(record: dict) -> str | None:
        dev = sum((record.get("eval_sizes") or {}).values())
        return f"train {record.get('train_size')}, dev {dev}" if record.get("train_size") is not None else None

    return Column(
        key=task,
        label=GLUE_LABELS.get(task, task),
        matches=lambda r, task=task: r.get("kind") == "glue" and r.get("task") == task,
        value=lambda r: r.get("best_metric"),
        size=size,
    )


def benchmark_column(bench: Benchmark) -> Column:
    def size(record: dict) -> str | None:
        n = lookup(record.get("eval"), bench.size_path) if bench.size_path else None
        return f"{n} test examples" if n is not None else None

    return Column(
        key=bench.key,
        label=bench.label,
        matches=lambda r: r.get("kind") == "instruct",
        value=lambda r: lookup(r.get("eval"), bench.score_path),
        size=size,
    )


DEV_LOSS = Column(
    key="dev_loss",
    label="Dev loss",
    matches=lambda r: r.get("kind") == "instruct",
    value=lambda r: r.get("best_metric"),
    size=lambda r: f"Alpaca train {r.get('train_size')}, dev {sum((r.get('eval_sizes') or {}).values())}" if r.get("train_size") is not None else None,
    scale=1.0,
    digits=3,
    higher_is_better=False,
    in_average=False,
)


def _glue_tasks(name: str, records: list[dict], profile: str | None) -> list[str]:
    tasks = spec_tasks(name, profile) if profile else None
    if not tasks:
        tasks = sorted({r["task"] for r in records if r.get("task")}, key=lambda t: (GLUE_ORDER.index(t) if t in GLUE_ORDER else 99, t))
    return tasks


def _metric_note(records: list[dict], tasks: list[str]) -> str:
    names = {}
    for r in records:
        if r.get("task") in tasks and r.get("metric"):
            names.setdefault(METRIC_NAMES.get(r["metric"], r["metric"]), []).append(GLUE_LABELS.get(r["task"], r["task"]))
    per = "; ".join(f"{m} ({', '.join(dict.fromkeys(ts))})" for m, ts in names.items())
    return (f"Dev-set metric ×100 at each run's best epoch: {per}. Cells: mean ± sample std over seeds; "
            "'(n=k)' is the n picked per task by mean dev metric; '[k/K]': only k of K seeds completed; '—': no completed run.")


def _finish(name: str, title: str, columns: list[Column], specs: list[RowSpec], records: list[dict], metric_note: str, notes: list[str]) -> Table:
    rows, excluded, used = build_rows(records, specs, columns)
    expected = max((c.n for r in rows for c in r.cells.values()), default=0)
    paper = {s.label: PAPER_NUMBERS.get(name, {}).get(s.label, NOT_AVAILABLE) for s in specs}
    return Table(name=name, title=title, columns=columns, rows=rows, caption=caption(used, columns, expected, metric_note),
                 excluded=excluded, notes=notes, paper=paper, expected_seeds=expected)


def _melora_n_rows(r: int, ns: tuple[int, ...]) -> list[RowSpec]:
    settings = tuple(f"MELoRA n={n} r={r}" for n in ns)
    best = RowSpec(f"MELoRA r={r} (best n)", settings, pick="per_column", pick_names={t: f"n={n}" for t, n in zip(settings, ns)})
    return [best] + [RowSpec(t, (t,)) for t in settings]


def _one(label: str, group: str = "") -> RowSpec:
    """A row of one setting, named by its label (``label_of``)."""
    return RowSpec(label, (label,), group=group)


# The paper's protocol picks each run's best epoch (and MELoRA's n) on the dev set these tables
# report; the held-out protocol's tables (melora.experiments.report.protocol) do not.
OPTIMISTIC = "; paper protocol: epoch and n chosen on this dev set (optimistic, see *_heldout)"


def table2(records: list[dict], model: str | None = None, profile: str | None = None) -> Table:
    """Table 2: GLUE dev, baselines at r=8 against MELoRA r=8 and r=1 (best n and every n)."""
    records, model, profile = scope(records, "glue", model, profile)
    tasks = _glue_tasks("table2", records, profile)
    columns = [glue_column(t) for t in tasks]
    r8, r1 = _melora_n_rows(8, (2, 4, 8)), _melora_n_rows(1, (2, 4, 8))
    specs = [
        _one("LoRA r=8"),
        _one("DyLoRA r=8"),
        _one("AdaLoRA r=8"),
        _one("Delta-LoRA r=8"),
        r8[0], r1[0], *r8[1:], *r1[1:],
    ]
    title = f"Table 2: GLUE dev results, {model or 'no runs'} (paper: RoBERTa-base){OPTIMISTIC}"
    return _finish("table2", title, columns, specs, records, _metric_note(records, tasks),
                   ["Params: trainable adapter parameters (the task head, trained in full by every method, is not counted: the classifier, and for BERT-style models such as MiniLM the pooler)."])


def table4(records: list[dict], model: str | None = None, profile: str | None = None) -> Table:
    """Table 4: GLUE at equivalent ranks 4, 8, 16; LoRA r=R against MELoRA n=2, r=R/2."""
    records, model, profile = scope(records, "glue", model, profile)
    tasks = _glue_tasks("table4", records, profile)
    columns = [glue_column(t) for t in tasks]
    specs = []
    for rank in (4, 8, 16):
        specs += [_one(f"LoRA r={rank}", group=f"R={rank}"), _one(f"MELoRA n=2 r={rank // 2}", group=f"R={rank}")]
    title = f"Table 4: GLUE dev results at equivalent rank R, {model or 'no runs'} (paper: RoBERTa-base){OPTIMISTIC}"
    return _finish("table4", title, columns, specs, records, _metric_note(records, tasks),
                   ["R: equivalent rank n·r. MELoRA n=2 has half of LoRA's trainable parameters at the same R."])


def _instruct_note() -> str:
    benches = "; ".join(f"{b.label} {b.metric}" for b in BENCHMARKS)
    return (f"INSTRUCTEVAL scores ×100 ({benches}) of each run's best checkpoint (lowest dev loss); dev loss on the "
            "held-out Alpaca samples. Cells: mean ± sample std over seeds; '[k/K]': only k of K seeds evaluated; '—': no run.")


# The reference row of Tables 3 and 5: the model before instruction tuning.
BASE_ROW = RowSpec("Base model (no adapter)", (BASE_TAG,))
BASE_NOTE = ("Base model: the pretrained model without adapter, evaluated the same way; its dev loss is the one "
             "each training run measured before its first step.")


def instruct_columns() -> list[Column]:
    return [benchmark_column(b) for b in BENCHMARKS] + [DEV_LOSS]


def _instruct_table(name: str, title: str, specs: list[RowSpec], records: list[dict], note: str) -> Table:
    """A Table 3/5: the INSTRUCTEVAL columns and notes, ``note`` first."""
    return _finish(name, title, instruct_columns(), specs, records, _instruct_note(), [note, BASE_NOTE])


def table3(records: list[dict], model: str | None = None, profile: str | None = None) -> Table:
    """Table 3: INSTRUCTEVAL, LoRA r in {8..256} against MELoRA r=1, n in {8..64}; best of each by dev loss."""
    records, model, profile = scope(records, "instruct", model, profile)
    lora_r, melora_n = (8, 16, 32, 64, 128, 256), (8, 16, 32, 64)
    lora_settings = tuple(f"LoRA r={r}" for r in lora_r)
    melora_settings = tuple(f"MELoRA n={n} r=1" for n in melora_n)
    specs = [
        BASE_ROW,
        RowSpec("LoRA (best r by dev loss)", lora_settings, pick="overall", by=DEV_LOSS, pick_names={t: f"r={r}" for t, r in zip(lora_settings, lora_r)}),
        RowSpec("MELoRA r=1 (best n by dev loss)", melora_settings, pick="overall", by=DEV_LOSS, pick_names={t: f"n={n}" for t, n in zip(melora_settings, melora_n)}),
        *[_one(t) for t in lora_settings],
        *[_one(t) for t in melora_settings],
    ]
    title = f"Table 3: INSTRUCTEVAL after Alpaca instruction tuning, {model or 'no runs'} (paper: LLaMA-2-7B)"
    return _instruct_table("table3", title, specs, records,
                           "Avg: mean of the four benchmarks. The best setting of a method is chosen by mean dev loss, never by test scores.")


def table5(records: list[dict], model: str | None = None, profile: str | None = None) -> Table:
    """Table 5: INSTRUCTEVAL at equivalent ranks 16, 32, 64; LoRA r=R against MELoRA n=2, r=R/2."""
    records, model, profile = scope(records, "instruct", model, profile)
    specs = [BASE_ROW]
    for rank in (16, 32, 64):
        specs += [_one(f"LoRA r={rank}", group=f"R={rank}"), _one(f"MELoRA n=2 r={rank // 2}", group=f"R={rank}")]
    title = f"Table 5: INSTRUCTEVAL at equivalent rank R, {model or 'no runs'} (paper: LLaMA-2-7B)"
    return _instruct_table("table5", title, specs, records,
                           "R: equivalent rank n·r; MELoRA n=2, r=R/2 (Table 4's design: MELORA.md does not give the paper's setting).")


def demo(records: list[dict], model: str | None = None, profile: str | None = None) -> Table:
    """``make demo``: LoRA r=8 against MELoRA with its parameters (n=2, r=8) and 8× fewer (n=8, r=1)."""
    records, model, profile = scope(records, "glue", model, profile)
    tasks = _glue_tasks("demo", records, profile)
    specs = [_one("LoRA r=8"), _one("MELoRA n=2 r=8"), _one("MELoRA n=8 r=1")]
    title = f"Demo (a slice of Table 2): GLUE dev results, {model or 'no runs'}"
    return _finish("demo", title, [glue_column(t) for t in tasks], specs, records, _metric_note(records, tasks),
                   ["MELoRA n=2 r=8 has LoRA r=8's trainable parameters; n=8 r=1 has 8× fewer. The full n sweep: make table2."])


TABLES = {"table2": table2, "table3": table3, "table4": table4, "table5": table5, "demo": demo}
