"""Run safety: one process per run folder, damaged files, one-line configuration errors.

Locks are checked with real processes (a holder that is stopped or killed with
SIGKILL); damaged files by truncating each kind in a finished smoke GLUE run and
running it again; configuration errors through ``python -m melora.<entry>``.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import data_dir, tiny_bert
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = str(ROOT / "configs")
# A smoke GLUE run of a few seconds: 4 steps an epoch, 2 epochs.
TASK = ["task=glue/sst2", "task.max_train_samples=32", "task.max_eval_samples=32", "task.epochs=2"]
SMOKE = [*TASK, "method=lora"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
HOLDER = (
    "import sys, time\n"
    "from melora.experiments.train.runlock import run_lock\n"
    "with run_lock(sys.argv[1]) as held:\n"
    "    print('held' if held else 'busy', flush=True)\n"
    "    time.sleep(600)\n"
)


@pytest.fixture
def processes():
    """Processes a test starts; killed at the end if still running."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def hold_lock(run_dir, processes) -> subprocess.Popen:
    """A separate process holding ``run_dir``'s lock (it says whether it got it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)
    processes.append(proc)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_cli(entry: str, *overrides, env=None, timeout=300):
    cmd = [sys.executable, "-m", f"melora.experiments.{entry}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def train_in_process(run_dir, *overrides):
    from melora.experiments.glue import train_glue

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("config", overrides=["profile=smoke", f"run_dir={run_dir}", *overrides])
    return train_glue(cfg)


def read(run_dir) -> dict:
    return json.loads((Path(run_dir) / "record.json").read_text())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---- one process per run folder ------------------------------------------------------------------


def test_a_held_lock_is_seen_by_other_processes_and_freed_when_its_holder_is_killed(tmp_path, processes):
    from melora.experiments.train.runlock import LOCK_FILE, run_lock

    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir, processes)
    assert (run_dir / LOCK_FILE).is_file()
    with run_lock(run_dir) as held:
        assert not held
    other = subprocess.run([sys.executable, "-c", HOLDER.replace("600", "0"), str(run_dir)], cwd=ROOT, capture_output=True,
                           text=True, env=ENV, timeout=120)
    assert other.stdout.strip() == "busy", other.stderr[-2000:]
    kill(holder)  # SIGKILL: no clean-up code runs, the kernel drops the lock
    with run_lock(run_dir) as held:
        assert held
        with run_lock(run_dir) as again:  # a second entry in the same process is excluded too
            assert not again
    with run_lock(run_dir) as held:
        assert held


def test_a_locked_run_is_skipped_by_the_cli_without_training(tmp_path, processes):
    run_dir = tmp_path / "run"
    hold_lock(run_dir, processes)
    proc = run_cli("glue", f"hydra.run.dir={run_dir}", "profile=smoke", *SMOKE)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = [l for l in out.splitlines() if "in use by another process" in l]
    assert len(lines) == 1 and str(run_dir) in lines[0], out[-3000:]
    assert not (run_dir / "record.json").exists() and not (run_dir / "config.yaml").exists()


def test_two_training_processes_on_one_run_one_trains_the_other_skips(tmp_path, processes):
    data_dir()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "melora.experiments.glue", f"hydra.run.dir={run_dir}", "profile=smoke", *SMOKE]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    processes.append(first)
    deadline = time.time() + 120
    while not (run_dir / "config.yaml").is_file():  # train_glue writes it holding the lock
        assert first.poll() is None and time.time() < deadline, "the first run did not start"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGSTOP)  # it keeps the lock, and cannot finish before the second one looks
    try:
        second = run_cli("glue", f"hydra.run.dir={run_dir}", "profile=smoke", *SMOKE)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "in use by another process" in out, out[-3000:]
    assert "adapter params" not in out  # it built no model
    assert first.wait(timeout=300) == 0
    record = read(run_dir)
    assert record["status"] == "completed" and len(record["history"]) == 2


# ---- damaged files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed smoke run, copied by each test before it damages a file."""
    data_dir()
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    record = train_in_process(run_dir, *SMOKE)
    assert record["status"] == "completed"
    return run_dir


def copy_run(finished_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns(".run.lock*"))
    return run_dir


def mark_unfinished(run_dir: Path) -> None:
    """As if the run was killed after its last checkpoint, before its final record."""
    record = read(run_dir)
    record["status"] = "running"
    (run_dir / "record.json").write_text(json.dumps(record))


def same_results(a: dict, b: dict) -> None:
    assert b["status"] == "completed"
    assert [h["accuracy"] for h in a["history"]] == [h["accuracy"] for h in b["history"]]
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]], rel=1e-5)
    assert (a["best_metric"], a["best_step"]) == (b["best_metric"], b["best_step"])


def warnings_naming(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(path) in r.getMessage()]


def test_a_damaged_record_is_moved_aside_and_the_run_resumes_from_its_checkpoint(finished_run, tmp_path, caplog):
    run_dir = copy_run(finished_run, tmp_path)
    truncate(run_dir / "record.json")
    damaged = (run_dir / "record.json").read_bytes()
    record = train_in_process(run_dir, *SMOKE)
    assert len(warnings_naming(caplog, run_dir / "record.json")) == 1
    assert (run_dir / "record.json.damaged").read_bytes() == damaged
    same_results(read(finished_run), record)
    same_results(read(finished_run), read(run_dir))


@pytest.mark.parametrize("name", ["adapter.safetensors", "state.json", "rng.safetensors", "optimizer.pt"])
def test_a_damaged_checkpoint_is_moved_aside_and_the_run_starts_over(finished_run, tmp_path, caplog, name):
    run_dir = copy_run(finished_run, tmp_path)
    mark_unfinished(run_dir)
    truncate(run_dir / "checkpoint" / name)
    record = train_in_process(run_dir, *SMOKE)
    messages = warnings_naming(caplog, run_dir / "checkpoint" / name)
    assert len(messages) == 1 and "training from scratch" in messages[0] and "\n" not in messages[0]
    assert (run_dir / "checkpoint.damaged" / name).stat().st_size < (finished_run / "checkpoint" / name).stat().st_size
    same_results(read(finished_run), record)
    a, b = load_file(str(finished_run / "checkpoint" / "adapter.safetensors")), load_file(str(run_dir / "checkpoint" / "adapter.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unfinished", [False, True], ids=["completed", "unfinished"])
def test_a_damaged_adapter_is_moved_aside_and_restored(finished_run, tmp_path, caplog, unfinished):
    run_dir = copy_run(finished_run, tmp_path)
    if unfinished:
        mark_unfinished(run_dir)
    truncate(run_dir / "adapter" / "adapter_model.safetensors")
    record = train_in_process(run_dir, *SMOKE)
    assert warnings_naming(caplog, run_dir / "adapter" / "adapter_model.safetensors")
    assert (run_dir / "adapter.damaged" / "adapter_model.safetensors").is_file()
    same_results(read(finished_run), record)
    a = load_file(str(finished_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_lost_best_adapter_is_rewritten_from_a_checkpoint_of_the_best_step(tmp_path, caplog):
    import melora
    from melora.adapters.io import adapter_state_dict
    from melora.experiments.train.checkpoint import apply_resume, inspect_resume, save_checkpoint

    def fresh():
        model = melora.inject(tiny_bert(num_labels=2), melora.LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]), seed=0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return model, optimizer, scheduler

    model, optimizer, scheduler = fresh()
    for layer in melora.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)
    melora.save_adapter(model, tmp_path / "adapter")
    state = {"global_step": 5, "epoch": 1, "best_metric": 0.5, "best_step": 5, "best_epoch": 1, "history": [{"step": 5}]}
    save_checkpoint(tmp_path, model, optimizer, scheduler, state)
    # Copies: load_file maps the file, which truncate() rewrites in place.
    expected = {k: v.clone() for k, v in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items()}
    truncate(tmp_path / "adapter" / "adapter_model.safetensors")

    plan = inspect_resume(tmp_path)
    assert plan.rewrite_adapter and plan.checkpoint is not None
    model2, optimizer2, scheduler2 = fresh()
    restored = apply_resume(plan, model2, optimizer2, scheduler2)
    assert restored["global_step"] == 5
    got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    assert (tmp_path / "adapter.damaged").is_dir()

    # The best adapter is of an earlier step than the checkpoint: start over, leave the model as it is.
    save_checkpoint(tmp_path, model, optimizer, scheduler, dict(state, global_step=9))
    shutil.rmtree(tmp_path / "adapter")
    plan = inspect_resume(tmp_path)
    model3, optimizer3, scheduler3 = fresh()
    before = {k: v.clone() for k, v in adapter_state_dict(model3).items()}
    assert apply_resume(plan, model3, optimizer3, scheduler3) is None
    for key, value in adapter_state_dict(model3).items():
        torch.testing.assert_close(value, before[key])
    assert any("training from scratch" in r.getMessage() for r in caplog.records)


def test_report_code_skips_a_damaged_record_with_a_warning(tmp_path, caplog):
    from melora.experiments.report.records import load_records
    from melora.experiments.runs import iter_records, read_record

    for name in ("good", "bad"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "record.json").write_text(json.dumps({"name": name, "kind": "glue", "status": "completed"}))
    truncate(tmp_path / "bad" / "record.json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "record.json").write_text("[1, 2]")  # valid JSON, not a record
    assert [r["name"] for r in iter_records(tmp_path)] == ["good"]
    assert len(warnings_naming(caplog, tmp_path / "bad" / "record.json")) == 1
    assert len(warnings_naming(caplog, tmp_path / "list" / "record.json")) == 1
    assert [r["name"] for r in load_records(tmp_path)] == ["good"]
    assert read_record(tmp_path / "bad") is None
    assert (tmp_path / "bad" / "record.json").is_file()  # readers leave it where it is


def test_a_damaged_evaluation_record_is_moved_aside(tmp_path, caplog):
    from melora.experiments.instructeval.run import read_eval_record
    from melora.experiments.runs import EVAL_RECORD

    (tmp_path / EVAL_RECORD).write_text('{"status": "running", "results": {')
    assert read_eval_record(tmp_path) is None
    assert (tmp_path / f"{EVAL_RECORD}.damaged").is_file() and not (tmp_path / EVAL_RECORD).exists()
    assert warnings_naming(caplog, tmp_path / EVAL_RECORD)


# ---- configuration errors on the command line ---------------------------------------------------


def assert_one_line_error(proc, fragment: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if fragment in l]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr[-3000:]


@pytest.mark.parametrize(
    "override,fragment",
    [("method.n=7", "is not divisible by n=7"), ("method.scaling=bogus", "scaling='bogus' is unknown")],
    ids=["bad-n", "unknown-scaling"],
)
def test_a_configuration_error_is_one_line_without_traceback(tmp_path, override, fragment):
    data_dir()
    proc = run_cli("glue", f"hydra.run.dir={tmp_path}", "profile=smoke", *TASK, "method=melora", override)
    assert_one_line_error(proc, fragment)


def test_hydra_full_error_gives_the_traceback(tmp_path):
    data_dir()
    proc = run_cli("glue", f"hydra.run.dir={tmp_path}", "profile=smoke", *TASK, "method=melora", "method.n=7",
                   env=dict(ENV, HYDRA_FULL_ERROR="1"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ValueError" in proc.stderr and "is not divisible by n=7" in proc.stderr


def test_instruct_and_instructeval_configuration_errors_are_one_line(tmp_path):
    run_dir = tmp_path / "instruct"
    run_dir.mkdir()
    (run_dir / "record.json").write_text(json.dumps({"config_hash": "0" * 16, "status": "completed"}))
    proc = run_cli("instruct", f"hydra.run.dir={run_dir}", "profile=smoke")
    assert_one_line_error(proc, "holds a run with a different config")

    adapter = tmp_path / "peft"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    proc = run_cli("instructeval", f"hydra.run.dir={tmp_path / 'eval'}", "profile=smoke", f"adapter_dir={adapter}")
    assert_one_line_error(proc, "is not a melora adapter config")


def test_an_unreachable_hub_model_says_how_to_run_offline(tmp_path):
    data_dir()
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # an empty cache: the hub is the only source
    proc = run_cli("glue", f"hydra.run.dir={tmp_path / 'run'}", "profile=smoke", *TASK, "model=roberta-base", env=env)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and "model.source=path model.name_or_path=<folder>" in lines[0] and "model=minilm" in lines[0]


def test_a_damaged_evaluation_record_is_left_out_not_fatal(tmp_path, caplog):
    from melora.experiments.report.records import load_records

    run = tmp_path / "unit" / "instruct-alpaca" / "m" / "lora_r8" / "seed0"
    run.mkdir(parents=True)
    (run / "record.json").write_text(json.dumps({"kind": "instruct", "status": "completed", "profile": "unit", "model": "m",
                                                 "method_tag": "lora_r8", "seed": 0}))
    (run / "eval_record.json").write_text('{"kind": "instructeval", "status": "compl')  # a node died mid-write
    records = load_records(tmp_path)
    assert len(records) == 1 and "eval" not in records[0]
    assert "eval_record.json is damaged" in caplog.text
