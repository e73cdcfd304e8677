"""Experiment specs: which runs a paper artifact needs, and running the missing ones.

A spec (``experiments/<name>.yaml``) lists groups of runs as Hydra overrides::

    name: table2
    entry: glue                     # glue | instruct
    profiles:                       # per-profile settings
      paper: {seeds: [0, 1, 2, 3, 4], overrides: [model=roberta-base], tasks: [glue/mnli, glue/rte]}
      mini:  {seeds: [0], overrides: [model=minilm], tasks: [glue/rte]}
    groups:
      - methods:                    # tasks: the profile's, unless the group lists its own
          - [method=lora, method.r=8]
          - [method=melora, method.r=8, "method.n=2,4,8"]   # a comma list is swept
      - profiles: [paper]           # optional: the group runs at these profiles only
        tasks: [glue/mrpc]
        methods:
          - [method=lora, method.r=16]

``expand(spec, profile)`` gives one override list per run (the cross product of
tasks × methods × comma lists × seeds). The runs are a Hydra multirun: the
``spec`` sweeper (``hydra_plugins/melora_sweeper``) leaves out the runs whose
record is complete (a run is identified by its resolved config) and hands the
rest to Hydra's launcher: ``hydra/launcher=local`` (joblib, ``n_jobs`` worker
processes on this machine, each with ``cores / n_jobs`` threads) or
``hydra/launcher=slurm`` (submitit, one cluster job per run). ``python -m
melora.experiments.sweep <spec> --profile mini --jobs 2`` is the short form, and also runs
INSTRUCTEVAL on the adapters an instruct spec trained.

Ctrl-C (or SIGTERM) stops a sweep within seconds, its workers included, and
prints one line: how many runs finished, how many stopped mid-run (they resume
from their last checkpoint) or never started, and the command that resumes
(the same command). A second Ctrl-C stops it at once. docs/experiments.md says more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from melora.experiments.specs import CONFIGS, ENTRIES, EXPERIMENTS, ROOT, RunSpec, expand, grid_lrs, load_spec, require_project  # noqa: F401 - the spec API, re-exported

log = logging.getLogger(__name__)
STOP_REPORTED_ENV = "MELORA_STOP_REPORTED"  # a file the child sweep creates once it has printed its interrupt summary


def with_chosen_lr(spec: dict, runs: list[RunSpec], profile: str, extra: list[str] | None = None, loader=None) -> list[RunSpec]:
    """Runs of an ``lr_from: <grid spec>`` spec, each at the lr chosen on validation from the grid's runs.

    A run whose (task, row, setting) grid is not complete yet (every lr at every
    grid seed) is left out with a message: run the grid spec first.
    """
    from omegaconf import OmegaConf

    from melora.experiments.report.protocol import choose, collect, row_of, setting_of
    from melora.experiments.report.records import load_records

    grid = load_spec(spec["lr_from"])
    lrs, grid_seeds = grid_lrs(grid), set(grid["profiles"][profile]["seeds"])
    chosen: dict[tuple, float | None] = {}
    out, waiting, cells = [], 0, None
    for run in runs:
        cfg = compose_run(run, extra, loader)
        if cells is None:
            root = Path(cfg.runs_root) / profile
            cells = collect(load_records(root))[0] if root.is_dir() else {}
        node = OmegaConf.to_container(cfg.method, resolve=True)
        mc = {"method": node.pop("name"), **{k: v for k, v in node.items() if k != "tag"}}
        key = (cfg.task.name, row_of(mc), setting_of(mc))
        if key not in chosen:
            options = {k: v for k, v in cells.items() if k[:3] == key and k[3] in lrs}
            complete = len(options) == len(lrs) and all(grid_seeds <= set(val.seeds) for val, _ in options.values())
            choice = choose(options, key[0], key[1]) if complete else None
            chosen[key] = choice.lr if choice else None
        if chosen[key] is None:
            waiting += 1
            continue
        out.append(RunSpec(run.entry, [*run.overrides, f"task.lr={chosen[key]:g}"]))
    if waiting:
        print(f"{spec['name']}: {waiting} runs wait for their lr grid ({spec['lr_from']}) to complete", flush=True)
    return out


LRS_PER_CHOICE = 3  # a choices_from row runs at the chosen lr and its two neighbours on the ladder


def grid_key(config: dict) -> str:
    """What a learning-rate grid varies over: the hash of a resolved run config without its lr, seed and folders.

    The data folder's path is left out too: records trained from another checkout (or with the
    data elsewhere) still count for the grid they belong to.
    """
    from melora.experiments.runs import config_hash

    keep = {k: v for k, v in config.items() if k not in ("seed", "run_dir", "data_dir")}
    keep["task"] = {k: v for k, v in (keep.get("task") or {}).items() if k != "lr"}
    if isinstance(keep.get("selection"), dict):
        keep["selection"] = {k: v for k, v in keep["selection"].items() if k != "folder"}
    return config_hash(keep)


def _override(run: RunSpec, key: str) -> str:
    return next(o for o in reversed(run.overrides) if o.startswith(f"{key}=")).partition("=")[2]


def _run_seed(run: RunSpec) -> int:
    return int(_override(run, "seed"))


def _run_lr(run: RunSpec) -> float:
    return float(_override(run, "task.lr"))


def with_bracketing_lrs(spec: dict, runs: list[RunSpec], profile: str, extra: list[str] | None = None, loader=None,
                        report: dict | None = None) -> list[RunSpec]:
    """Runs of an ``lr_bracket:`` spec: its grid, plus each setting's extension where the best lr is at an edge.

    A setting (the runs that differ only in lr and seed) whose best mean
    validation metric over seeds sits at an edge of the lrs it has records for
    gets its next lr on the 1-3 ladder, at every seed of the spec
    (:func:`melora.experiments.report.bracket.bracket`). One step per call: the sweep
    calls it again once those runs are done. ``report``, when given, is filled
    with each setting's :class:`~melora.experiments.report.bracket.Bracket`.
    """
    from omegaconf import OmegaConf

    from melora.experiments.report.bracket import bracket
    from melora.experiments.report.records import load_records, selection_of

    limits = spec["lr_bracket"]
    by_key: dict[str, list[RunSpec]] = {}
    root = None
    for run in runs:
        cfg = compose_run(run, extra, loader)
        root = root or Path(cfg.runs_root) / profile
        by_key.setdefault(grid_key(OmegaConf.to_container(cfg, resolve=True)), []).append(run)
    values: dict[str, dict[float, dict[int, float | None]]] = {}
    if root is not None and root.is_dir():
        for r in load_records(root):
            if r.get("kind") != "glue" or selection_of(r) != "dev_halves" or "config" not in r:
                continue
            key = grid_key(r["config"])
            if key not in by_key or not (r.get("status") == "completed" or r.get("diverged")):
                continue
            value = r.get("best_metric") if r.get("status") == "completed" else None
            values.setdefault(key, {}).setdefault(float(r["config"]["task"]["lr"]), {})[int(r["seed"])] = value
    out = list(runs)
    for key, key_runs in by_key.items():
        grid = {_run_lr(r) for r in key_runs}
        tried = {lr: {} for lr in grid} | values.get(key, {})
        state = bracket(tried, limits.get("min_lr", 1e-5), limits.get("max_lr", 0.3))
        if report is not None:
            report[key] = (key_runs[0], state)
        added = sorted(set(tried) - grid) + ([state.next_lr] if state.status == "extend" else [])
        templates = [r for r in key_runs if _run_lr(r) == _run_lr(key_runs[0])]  # one run per seed
        for lr in added:
            out += [RunSpec(t.entry, [o if not o.startswith("task.lr=") else f"task.lr={lr:g}" for o in t.overrides]) for t in templates]
    return out


def with_verdict_choices(spec: dict, runs: list[RunSpec], profile: str, extra: list[str] | None = None, loader=None) -> list[RunSpec]:
    """Runs of a ``choices_from: <dev-halves spec>`` spec: each row at the lr (and MELoRA's ``n``) that spec's Table 2 chose.

    A run's row is its Table 2 row (LoRA r=8; MELoRA r=1 takes the best-of-n
    choice's ``n``, replacing the spec's ``method.n``). It runs at the chosen lr
    and its two neighbours on the 1-3 ladder, so that an optimum that moves with
    longer training is seen (``lr_bracket`` on the same spec extends further).
    A row whose choice is not settled yet (fewer seeds than the source spec's
    profile, or its grid still being extended) is left out with a message.
    """
    from omegaconf import OmegaConf

    from melora.experiments.report import verdicts
    from melora.experiments.report.bracket import ladder_step
    from melora.experiments.report.records import load_records

    source = load_spec(spec["choices_from"])
    wanted = len(source["profiles"][profile]["seeds"])
    table, out, waiting = None, [], set()
    for run in runs:
        cfg = compose_run(run, extra, loader)
        if table is None:
            root = Path(cfg.runs_root) / profile
            records = load_records(root) if root.is_dir() else []
            table = verdicts.build(records, verdicts.TABLE2_VERDICTS, source_epochs(source, profile, extra, loader))
        node = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "tag"}
        mc = {"method": node.pop("name"), **node}
        row = verdicts.BEST_OF_N if mc["method"] == "melora" and mc.get("r") == 1 else verdicts.TABLE2_VERDICTS.row(mc)
        choice = table.rows.get(row, {}).get(cfg.task.name)
        settled = (choice is not None and len(choice.validation.seeds) >= wanted
                   and (choice.bracket is None or choice.bracket.status not in ("extend", "incomplete", "single")))
        if not settled:
            waiting.add((cfg.task.name, row))
            continue
        lrs = [ladder_step(choice.lr, up=False), choice.lr, ladder_step(choice.lr, up=True)]  # LRS_PER_CHOICE
        overrides = [o for o in run.overrides if not o.startswith(("task.lr=", "method.n="))]
        if row == verdicts.BEST_OF_N:
            overrides.append(f"method.{choice.setting}")  # "n=8" -> method.n=8
        out += [RunSpec(run.entry, [*overrides, f"task.lr={lr:g}"]) for lr in lrs]
    if waiting:
        print(f"{spec['name']}: {len(waiting)} (task, row) choices of {spec['choices_from']} are not settled yet; "
              f"their runs wait: {', '.join(f'{t} {r}' for t, r in sorted(waiting))}", flush=True)
    return out


def source_epochs(source: dict, profile: str, extra: list[str] | None = None, loader=None) -> dict[str, int]:
    """Task → the epochs the runs of spec ``source`` train for at ``profile``."""
    epochs: dict[str, int] = {}
    for run in expand(source, profile):
        cfg = compose_run(run, extra, loader)
        epochs.setdefault(cfg.task.name, int(cfg.task.epochs))
    return epochs


def expand_specs(names: list[str], profile: str, extra: list[str] | None = None, loader=None, seeds: int | None = None) -> list[RunSpec]:
    """The runs of several specs, each distinct run once (in first-seen order).

    ``seeds``: only the runs of the first ``seeds`` seeds of each spec's profile
    (a sweep runs seed waves so that a grid's extensions are found early).
    """
    runs, seen = [], set()
    for name in names:
        spec = load_spec(name)
        spec_runs = expand(spec, profile)
        if seeds is not None:
            wave = set(spec["profiles"][profile]["seeds"][:seeds])
            spec_runs = [r for r in spec_runs if _run_seed(r) in wave]
        if spec.get("lr_from"):
            spec_runs = with_chosen_lr(spec, spec_runs, profile, extra, loader)
        if spec.get("choices_from"):
            spec_runs = with_verdict_choices(spec, spec_runs, profile, extra, loader)
        if spec.get("lr_bracket"):
            spec_runs = with_bracketing_lrs(spec, spec_runs, profile, extra, loader)
        for run in spec_runs:
            key = (run.entry, frozenset(run.overrides))
            if key not in seen:
                seen.add(key)
                runs.append(run)
    return runs


def compose(config_name: str, overrides: list[str], loader=None):
    """The resolved config ``config_name`` + ``overrides`` would run with, ``run_dir`` set from Hydra's run dir pattern.

    ``loader``: the config loader of a running Hydra app (the sweeper's), which
    cannot compose through ``hydra.initialize_config_dir``.
    """
    from omegaconf import OmegaConf

    if loader is None:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    else:
        from hydra.types import RunMode

        cfg = loader.load_configuration(config_name=config_name, overrides=overrides, run_mode=RunMode.RUN)
    run_dir = cfg.hydra.run.dir
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    cfg.run_dir = run_dir
    return cfg


def compose_run(run: RunSpec, extra: list[str] | None = None, loader=None):
    """The resolved config of ``run`` (plus ``extra`` overrides), with its ``run_dir``."""
    return compose(ENTRIES[run.entry], [*run.overrides, *(extra or [])], loader)


def evaluate_run(train_cfg, adapter_dir: str | None) -> dict:
    """INSTRUCTEVAL of an instruct run's adapter (or of the base model: ``adapter_dir=None``).

    Composed from ``configs/instructeval.yaml`` with the training run's profile,
    model and runs root; a finished evaluation is skipped by ``evaluate_instruct``.
    """
    from melora.experiments.instructeval import evaluate_instruct

    overrides = [
        f"profile={train_cfg.profile.name}",
        f"model={train_cfg.model.name}",
        f"runs_root={train_cfg.runs_root}",
        f"adapter_dir={adapter_dir if adapter_dir else 'null'}",
    ]
    return evaluate_instruct(compose("instructeval", overrides))


def run_completed(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a record of a finished training."""
    from melora.experiments.runs import read_record

    record = read_record(run_dir)
    return record is not None and record.get("status") == "completed"


def run_diverged(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a run that diverged: final, not trained again (a grid reads it as collapsed)."""
    from melora.experiments.runs import read_record

    record = read_record(run_dir)
    return record is not None and bool(record.get("diverged"))


def run_finished(run_dir: str) -> bool:
    """Completed or diverged: nothing more to train."""
    return run_completed(run_dir) or run_diverged(run_dir)


def _job_threads(sweeper) -> int | None:
    """Threads per job of a local launcher (``cores / n_jobs``); ``None`` for cluster launchers."""
    if sweeper.threads_per_job:
        return sweeper.threads_per_job
    n_jobs = sweeper.config.hydra.launcher.get("n_jobs")
    if n_jobs is None:
        return None
    return max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 0 else 1  # n_jobs <= 0: joblib's one job per core


def interrupted_sweep(todo: list[tuple[RunSpec, str]], complete_before: int, command: str) -> str:
    """The summary line of a sweep stopped by Ctrl-C or SIGTERM.

    ``todo``: the ``(run, run_dir)`` the sweep launched; ``complete_before``:
    the runs that were complete already; ``command``: the command that resumes.
    """
    from melora.experiments.runs import RECORD_FILE

    finished = [d for _, d in todo if run_finished(d)]
    stopped = [d for _, d in todo if d not in finished and any((Path(d) / f).is_file() for f in (RECORD_FILE, "config.yaml"))]
    waiting = len(todo) - len(finished) - len(stopped)
    before = f" ({complete_before} more complete from before)" if complete_before else ""
    return (f"interrupted: {len(finished)} of {len(todo)} runs finished{before}, {len(stopped)} stopped mid-run "
            f"(they resume from their last checkpoint), {waiting} not started; rerun the same command to resume: {command}")


@contextlib.contextmanager
def _quiet_loky_abort(stop):
    """Inside the block, once ``stop`` has a signal, an exception in loky's executor manager thread is not printed.

    When joblib aborts a loky pool with runs still queued (``pre_dispatch: all``), the
    manager thread trips over the work items the abort cancelled (a ``KeyError``)
    after it has killed the workers; the traceback says nothing about the runs.
    """
    import threading

    previous = threading.excepthook

    def hook(args):
        if stop.signum is not None and args.thread is not None and args.thread.name == "ExecutorManagerThread":
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def sweep_specs(sweeper, arguments: list[str]) -> list:
    """The ``spec`` sweeper's work: expand the specs, skip complete runs, check the rest's settings, launch them.

    Args:
        sweeper: ``hydra_plugins.melora_sweeper.spec_sweeper.SpecSweeper`` after ``setup``.
        arguments: The command line's overrides, added to every run.

    Returns:
        The launcher's ``JobReturn`` per launched run. Exits with status 1 after
        the sweep if a run failed, naming each failed run's folder; with status 1
        and one ``Error:`` line before launching anything if a run's settings
        are invalid (:func:`melora.experiments.scaffold.validate_config`). SIGINT or
        SIGTERM stop the launcher's workers (the runs keep their last
        checkpoint) and exit with status 128 + signal after one summary line
        (:func:`interrupted_sweep`); a second signal kills the workers and exits at once.
    """
    from hydra.core.utils import JobStatus

    from melora.experiments.cli import RESUME_ENV, exit_on_user_error, resume_command, stop_signals

    config, loader = sweeper.config, sweeper.hydra_context.config_loader
    entry = next((e for e, name in ENTRIES.items() if name == config.hydra.job.config_name), None)
    names = ",".join(Path(s).stem for s in sweeper.specs)
    command = os.environ.get(RESUME_ENV) or resume_command(f"melora.experiments.{entry or 'glue'}")
    todo: list[tuple[RunSpec, str]] = []
    complete_before = 0
    with stop_signals() as stop, _quiet_loky_abort(stop):
        try:
            runs = expand_specs(sweeper.specs, sweeper.profile, arguments, loader=loader, seeds=getattr(sweeper, "seeds", None))
            others = sorted({r.entry for r in runs} - {entry})
            if others:
                raise ValueError(f"spec(s) {names} hold runs of melora.experiments.{others[0]}, not of this entry: use python -m melora.experiments.sweep {names} "
                                 f"--profile {sweeper.profile}")
            configs = []
            for run in runs:
                cfg = compose_run(run, arguments, loader)
                if not run_finished(cfg.run_dir):
                    todo.append((run, cfg.run_dir))
                    configs.append(cfg)
            complete_before = len(runs) - len(todo)
            print(f"{names} ({sweeper.profile}): {len(runs)} runs, {complete_before} complete, {len(todo)} to run", flush=True)
            if sweeper.list_only or not todo:
                for run, run_dir in todo:
                    print(f"  {run}  ->  {run_dir}")
                return []
            from melora.experiments.scaffold import validate_config

            for cfg in configs:  # every run's settings, before any worker loads a model
                validate_config(cfg)
            threads = _job_threads(sweeper)
            if threads:  # the launcher's worker processes read it when torch starts; this process is job 0 at n_jobs=1
                os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
                import torch

                torch.set_num_threads(threads)
            start = time.time()
            results = sweeper.launcher.launch([[*run.overrides, *arguments] for run, _ in todo], initial_job_idx=0)
        except KeyboardInterrupt:
            # joblib has stopped its workers (its abort kills them); each run keeps its last checkpoint.
            print(interrupted_sweep(todo, complete_before, command), file=sys.stderr, flush=True)
            if os.environ.get(STOP_REPORTED_ENV):  # melora.experiments.sweep, this process's parent, prints no line of its own
                with contextlib.suppress(OSError):
                    Path(os.environ[STOP_REPORTED_ENV]).touch()
            raise SystemExit(stop.status) from None
        except (ValueError, OSError) as err:
            exit_on_user_error(err)
            raise
    outcome: dict[str, list[str]] = {"completed": [], "diverged": [], "locked": [], "failed": []}
    for (run, run_dir), result in zip(todo, results):
        if run_diverged(run_dir):  # a learning rate too large for the setting: a result, not a failure
            outcome["diverged"].append(run_dir)
        elif result.status == JobStatus.FAILED:
            outcome["failed"].append(f"{run_dir}: {type(result._return_value).__name__}: {result._return_value}")
        else:  # an entry returns normally for a completed run or for one another process holds
            outcome["completed" if run_completed(run_dir) else "locked"].append(run_dir)
    print(f"{names}: {', '.join(f'{len(v)} {k}' for k, v in outcome.items())} in {(time.time() - start) / 60:.1f} min", flush=True)
    for folder in outcome["diverged"]:
        print(f"  diverged (kept as collapsed, not retried): {folder}")
    for folder in outcome["locked"]:
        print(f"  locked (another process trains it): {folder}")
    for line in outcome["failed"]:
        print(f"  FAILED: {line}")
    if outcome["failed"]:
        raise SystemExit(1)
    return results


class Interrupted(SystemExit):
    """SIGINT or SIGTERM stopped a sweep: exit status ``128 + signum``; ``reported``: whether its child printed the summary line."""

    def __init__(self, signum: int, reported: bool) -> None:
        super().__init__(128 + signum)
        self.signum, self.reported = signum, reported


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a live (not zombie) process."""
    try:
        import psutil
    except ImportError:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
    return False


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def call_in_group(command: list[str], cwd: Path | str | None = None, grace_s: float = 8.0, env: dict | None = None) -> int:
    """``subprocess.call(command)`` in a process group of its own, stopped as a whole with this process.

    Hydra's joblib launcher trains in loky worker processes that outlive their
    parent when it is killed. A SIGINT or SIGTERM to this process is passed to
    the child as SIGTERM: the child (:func:`sweep_specs`) stops its workers,
    prints the summary line and exits, and its resource trackers clean up after
    it. Whatever of the child's group is left ``grace_s`` seconds after the
    signal is killed; a second signal kills the group at once.

    Returns:
        The child's exit status.

    Raises:
        Interrupted: a signal stopped it; the child's group is gone by then.
    """
    import tempfile

    received: list[int] = []
    holder: dict = {}  # the child
    # The child touches this file once it has printed the summary line (sweep_specs): then this process adds none.
    marker = Path(tempfile.mkdtemp(prefix="melora-sweep-")) / "reported"
    env = dict(os.environ if env is None else env, **{STOP_REPORTED_ENV: str(marker)})

    def on_signal(signum, frame):
        received.append(signum)
        proc = holder.get("proc")
        if proc is None:
            return  # not started yet: stopped right after it starts
        if len(received) == 1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        else:  # a second Ctrl-C: no waiting
            _kill_group(proc.pid)
            raise Interrupted(received[0], reported=marker.exists())

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        proc = holder["proc"] = subprocess.Popen(command, cwd=cwd, start_new_session=True, env=env)
        if received:
            os.kill(proc.pid, signal.SIGTERM)
        deadline = None
        while True:  # short waits: the handler must not interrupt a wait it would then wait on itself
            if received and deadline is None:
                deadline = time.monotonic() + grace_s
            try:
                status = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    _kill_group(proc.pid)
        if not received:
            return status
        deadline = deadline or time.monotonic() + grace_s
        # The child is gone; its resource trackers unlink what it left and exit: give them the rest of the grace.
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.05)
        _kill_group(proc.pid)
        raise Interrupted(received[0], reported=marker.exists())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(marker.parent, ignore_errors=True)


def spec_cost(name: str, profile: str, extra: list[str] | None = None) -> dict:
    """What one spec has cost so far: its runs, how many are complete, their summed and median run time.

    Read from the records under the runs folder ``extra`` points at (``runs_root=…``). A
    ``lr_from`` spec counts only the runs whose lr its grid has chosen (``waiting``: the others); a
    ``choices_from`` spec counts the runs of its settled rows, and for each row still waiting the three
    lrs it will run at least (``waiting``); an ``lr_bracket`` spec counts its grid with the extensions
    its records have asked for so far.
    Returns ``{"spec", "runs", "complete", "waiting", "summed_min", "median_min"}``.
    """
    import io
    import statistics

    from melora.experiments.runs import read_record

    spec = load_spec(name)
    every = expand(spec, profile)
    with contextlib.redirect_stdout(io.StringIO()):  # with_chosen_lr prints what waits for its grid
        runs = expand_specs([name], profile, extra)
    minutes = []
    for run in runs:
        record = read_record(compose_run(run, extra).run_dir)
        if record is not None and record.get("status") == "completed" and record.get("wall_time_s") is not None:
            minutes.append(record["wall_time_s"] / 60)
    # An lr_bracket grid only grows (its extensions are runs too); lr_from and choices_from runs wait.
    if spec.get("choices_from"):
        # A settled row runs at its chosen lr and the two neighbours; a row still waiting will run at least as many.
        def row(run: RunSpec) -> tuple[str, ...]:
            return tuple(o for o in run.overrides if not o.startswith(("task.lr=", "method.n=", "runs_root=")))

        settled = {row(run) for run in runs}
        waiting = LRS_PER_CHOICE * sum(row(run) not in settled for run in every)
    else:
        waiting = max(len(every) - len(runs), 0)
    return {"spec": name, "runs": len(runs) + waiting, "complete": len(minutes), "waiting": waiting,
            "summed_min": sum(minutes), "median_min": statistics.median(minutes) if minutes else None}


def cost_table(names: list[str], profile: str, extra: list[str] | None = None) -> str:
    """A Markdown table of :func:`spec_cost` for each spec (runs shared between specs count in each)."""
    lines = ["| spec | runs | complete | waiting for an lr choice | summed run time | median per run |", "|---|--:|--:|--:|--:|--:|"]
    for name in names:
        c = spec_cost(name, profile, extra)
        median = f"{c['median_min']:.1f} min" if c["median_min"] is not None else "—"
        lines.append(f"| {name} | {c['runs']} | {c['complete']} | {c['waiting']} | {c['summed_min'] / 60:.1f} h | {median} |")
    return "\n".join(lines) + "\n"


def pending(names: list[str], profile: str, extra: list[str] | None = None, seeds: int | None = None) -> list[str]:
    """Run folders of the specs' runs (of the first ``seeds`` seeds) that are not finished yet."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        runs = expand_specs(names, profile, extra, seeds=seeds)
    return [d for d in (compose_run(run, extra).run_dir for run in runs) if not run_finished(d)]


def run_waves(command: list[str], specs: list[str], profile: str, extra: list[str] | None = None, env: dict | None = None) -> int:
    """Run the sweep ``command`` (with environment ``env``); for ``lr_bracket`` specs, in seed waves until every grid brackets.

    Wave k runs the first k seeds of every spec, again and again while a round
    adds runs (a grid whose best lr sits at an edge gets its next lr), so the
    grids are extended on the first seeds before the later seeds run. Stops
    early when a round leaves the same runs unfinished (failed or locked).
    Returns the first non-zero exit status, else 0.

    Raises:
        Interrupted: Ctrl-C or SIGTERM stopped a wave (no later wave starts).
    """
    bracketing = [load_spec(name) for name in specs if load_spec(name).get("lr_bracket")]
    waves = range(1, max(len(s["profiles"][profile]["seeds"]) for s in bracketing) + 1) if bracketing else [None]
    status = 0
    for wave in waves:
        before = None
        while True:
            wave_command = command + ([f"hydra.sweeper.seeds={wave}"] if wave is not None else [])
            print(" ".join(wave_command), flush=True)
            status = call_in_group(wave_command, cwd=ROOT, env=env) or status
            if wave is None:
                return status
            left = pending(specs, profile, extra, seeds=wave)
            if not left:
                break
            if left == before:
                print(f"seed wave {wave}: {len(left)} runs stay unfinished (failed or locked); stopping", flush=True)
                return status or 1
            before = left
    return status


def check_arguments(args, names: list[str]) -> dict[str, list[str]]:
    """The specs by entry, after checking the command line (specs, profile, jobs, launcher, overrides) before anything runs.

    Raises:
        ValueError: an argument no sweep can use, with the fix (``FileNotFoundError``: an unknown spec).
    """
    from melora.experiments.scaffold import check_overrides, validate_config

    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs} is invalid: give the number of local worker processes, at least 1 (e.g. --jobs 2)")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads} is invalid: give the torch threads per job, at least 1, or 0 for cores / jobs")
    by_entry: dict[str, list[str]] = {}
    for name in names:
        spec = load_spec(name)
        expand(spec, args.profile)  # a profile the spec lacks: the error lists the ones it has
        by_entry.setdefault(spec["entry"], []).append(name)
    check_overrides([f"hydra/launcher={args.launcher}", *args.overrides])
    for specs in by_entry.values():  # settings every run shares (the children check each run's before launching)
        first = next((runs[0] for runs in (expand(load_spec(name), args.profile) for name in specs) if runs), None)
        if first is not None:
            validate_config(compose_run(first, args.overrides))
    return by_entry


def sweep(args, names: list[str], command: str) -> int:
    """Run the specs ``names`` as the parsed command line ``args`` says; returns the exit status.

    Raises:
        Interrupted: Ctrl-C or SIGTERM stopped a sweep's child.
    """
    from melora.experiments.cli import RESUME_ENV

    env = dict(os.environ, **{RESUME_ENV: command})
    by_entry = check_arguments(args, names)
    if args.list:
        for run in expand_specs(names, args.profile, args.overrides):
            print(run)
        return 0
    if args.cost:
        print(cost_table(names, args.profile, args.overrides), end="")
        return 0
    status = 0
    for entry, specs in by_entry.items():
        runs = expand_specs(specs, args.profile, args.overrides) if entry == "instruct" else []
        if runs:  # the base model's row of Tables 3 and 5, before the adapters
            evaluate_run(compose_run(runs[0], args.overrides), adapter_dir=None)
        command_line = [sys.executable, "-m", f"melora.experiments.{entry}", "-m", "hydra/sweeper=spec", f"hydra.sweeper.specs=[{','.join(specs)}]",
                        f"hydra.sweeper.profile={args.profile}", f"hydra/launcher={args.launcher}",
                        *([f"hydra.launcher.n_jobs={args.jobs}"] if args.launcher == "local" else []),
                        *([f"hydra.sweeper.threads_per_job={args.threads}"] if args.threads else []), *args.overrides]  # fmt: skip
        status = run_waves(command_line, specs, args.profile, args.overrides, env=env) or status
        for run in runs:  # INSTRUCTEVAL of every trained adapter (a finished evaluation is skipped)
            cfg = compose_run(run, args.overrides)
            if run_completed(cfg.run_dir):
                evaluate_run(cfg, adapter_dir=cfg.run_dir)
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m melora.experiments.sweep``: returns the exit status (1 after an ``Error:`` line, 130 after Ctrl-C, 143 after SIGTERM)."""
    import argparse

    from melora.experiments.cli import exit_on_user_error, resume_command, stop_signals

    parser = argparse.ArgumentParser(description="Run the runs an experiment spec needs (skipping complete ones) as a Hydra multirun. "
                                     "Ctrl-C stops every run (each keeps its last checkpoint); the same command resumes.")
    parser.add_argument("spec", help="experiments/<spec>.yaml name or a path; several: comma-separated (table2,table4)")
    parser.add_argument("--profile", default="mini", help="paper | mini | smoke")
    parser.add_argument("--list", action="store_true", help="print the runs and exit")
    parser.add_argument("--cost", action="store_true", help="print each spec's complete runs and their summed run time, and exit")
    parser.add_argument("--jobs", type=int, default=1, help="local worker processes (each gets cores/jobs threads)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per local job (default: cores / jobs)")
    parser.add_argument("--launcher", default="local", help="hydra/launcher: local (joblib, --jobs processes) | slurm | any other")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (HYDRA_FULL_ERROR=1 for the runs too)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. runs_root=…)")
    args = parser.parse_intermixed_args(argv)
    names = args.spec.split(",")
    command = resume_command("melora.experiments.sweep", sys.argv[1:] if argv is None else argv)
    if args.debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    with stop_signals() as stop:  # this process's own work (composing, INSTRUCTEVAL) stops on SIGTERM as on Ctrl-C
        try:
            require_project()
            return sweep(args, names, command)
        except Interrupted as err:
            if not err.reported:  # the child stopped before it could say what it left
                print(f"interrupted: finished runs are kept, unfinished ones "
                      f"resume from their last checkpoint; rerun the same command to resume: {command}", file=sys.stderr, flush=True)
            return 128 + err.signum
        except KeyboardInterrupt:
            print(f"interrupted: finished runs and evaluations are kept, unfinished ones resume; rerun the same "
                  f"command to resume: {command}", file=sys.stderr, flush=True)
            return stop.status
        except (ValueError, OSError) as err:
            exit_on_user_error(err)
            raise


if __name__ == "__main__":
    raise SystemExit(main())
