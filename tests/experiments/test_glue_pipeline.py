"""The GLUE pipeline end to end: config composition, smoke runs, resume, two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import data_dir
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = str(ROOT / "configs")
TASKS = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"]
METHODS = ["lora", "melora", "dylora", "adalora", "delta_lora"]
PROFILES = ["paper", "mini", "smoke"]


def compose_glue(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("method", METHODS)
def test_every_task_method_profile_composes(profile, method):
    from omegaconf import OmegaConf

    from melora.experiments.scaffold import adapter_config, trainer_config

    for task in TASKS:
        cfg = compose_glue([f"task=glue/{task}", f"method={method}", f"profile={profile}", "runs_root=/tmp/x"])
        OmegaConf.resolve(cfg.method)
        acfg = adapter_config(cfg.method, total_steps=1000)
        assert acfg.method == method
        assert acfg.target_modules == ["query", "value"]
        tcfg = trainer_config(cfg)
        if profile == "paper":
            # official glue_finetune.sh values
            assert tcfg.lr == (5e-4 if task in ("mnli", "sst2") else 4e-4)
            assert tcfg.batch_size == (64 if task == "cola" else 128)
            assert cfg.task.max_length == (512 if task == "rte" else 256)
            assert tcfg.weight_decay == 0.1 and tcfg.warmup_ratio == 0.06
        run_dir = cfg.hydra.run.dir
        assert run_dir.startswith(f"/tmp/x/{profile}/glue-{task}/minilm/")


def test_paper_epochs():
    epochs = {t: compose_glue([f"task=glue/{t}", "profile=paper"]).task.epochs for t in TASKS}
    assert epochs == {"mnli": 30, "sst2": 60, "mrpc": 30, "cola": 80, "qnli": 25, "qqp": 25, "rte": 80, "stsb": 40}


def test_step_fractions_and_adalora_total_step():
    from melora.experiments.scaffold import adapter_config

    cfg = compose_glue(["method=adalora"])
    acfg = adapter_config(cfg.method, total_steps=500)
    assert (acfg.total_step, acfg.tinit, acfg.tfinal) == (500, 50, 100)
    cfg = compose_glue(["method=delta_lora"])
    assert adapter_config(cfg.method, total_steps=500).update_start_step == 50


def run_glue(run_dir, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "melora.experiments.glue", f"hydra.run.dir={run_dir}", "profile=smoke", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def train_in_process(run_dir, *overrides):
    """The same code path as the CLI, without paying the interpreter start-up per run."""
    from melora.experiments.glue import train_glue

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("config", overrides=["profile=smoke", f"run_dir={run_dir}", *overrides])
    return train_glue(cfg)


def read(run_dir):
    return json.loads((Path(run_dir) / "record.json").read_text())


RECORD_FIELDS = {
    "config", "config_hash", "history", "best_metric", "best_epoch", "trainable_params", "total_params",
    "equivalent_rank", "wall_time_s", "peak_memory_mb", "throughput_samples_per_s", "versions", "git_commit", "device",
}


@pytest.mark.parametrize(
    "method,extra",
    [
        ("lora", []),
        ("melora", ["method.n=8", "method.r=1"]),
        ("dylora", []),
        ("adalora", ["method.tinit=2", "method.tfinal=2", "method.deltaT=2"]),
        ("delta_lora", ["method.update_start_step=2"]),
    ],
)
def test_smoke_run_per_method_on_real_data(tmp_path, method, extra):
    data_dir()
    run_dir = tmp_path / method
    # SST-2 sentences are short: 3 epochs of 64 examples take seconds.
    train_in_process(run_dir, "task=glue/sst2", f"method={method}", "task.epochs=3", "task.lr=3e-3", *extra)
    record = read(run_dir)
    assert record["status"] == "completed"
    assert RECORD_FIELDS <= set(record)
    assert len(record["history"]) == 3
    losses = [h["train_loss"] for h in record["history"]]
    assert losses[-1] < losses[0], losses
    assert 0.0 <= record["best_metric"] <= 1.0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file()
    if method == "melora":
        assert record["equivalent_rank"] == 8
        assert record["adapter_params"] == 12 * (384 + 384) * 1


def test_rerun_of_a_completed_run_is_skipped(tmp_path):
    data_dir()
    proc = run_glue(tmp_path, "task=glue/rte", "method=lora", "task.epochs=1", "task.max_train_samples=16", "task.max_eval_samples=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stamp = (tmp_path / "record.json").stat().st_mtime_ns
    proc = run_glue(tmp_path, "task=glue/rte", "method=lora", "task.epochs=1", "task.max_train_samples=16", "task.max_eval_samples=16")
    assert proc.returncode == 0 and "already complete" in proc.stderr + proc.stdout
    assert (tmp_path / "record.json").stat().st_mtime_ns == stamp
    proc = run_glue(tmp_path, "task=glue/rte", "method=lora", "task.epochs=2", "task.max_train_samples=16", "task.max_eval_samples=16")
    assert proc.returncode != 0 and "holds a run with a different config (task.epochs=1 (recorded) vs 2)" in proc.stderr


def test_killed_run_resumes_to_the_same_result(tmp_path):
    data_dir()
    args = ["task=glue/mrpc", "method=melora", "method.n=4", "method.r=2", "task.epochs=3"]  # 8 steps an epoch
    full = run_glue(tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "melora.experiments.glue", f"hydra.run.dir={killed}", "profile=smoke", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["global_step"] >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read(killed)["status"] == "running"
    assert read(killed)["global_step"] < read(tmp_path / "full")["global_step"]

    resumed = run_glue(killed, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read(tmp_path / "full"), read(killed)
    assert b["status"] == "completed"
    assert [h["accuracy"] for h in a["history"]] == [h["accuracy"] for h in b["history"]]
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]], rel=1e-6)
    wa = load_file(str(tmp_path / "full" / "checkpoint" / "adapter.safetensors"))
    wb = load_file(str(killed / "checkpoint" / "adapter.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7)


def test_nan_loss_stops_with_a_failed_record(tmp_path):
    from melora.experiments.train.trainer import TrainingDiverged

    data_dir()
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf)"):
        train_in_process(tmp_path, "task=glue/sst2", "method=lora", "task.lr=1e30", "trainer.max_grad_norm=0", "task.epochs=3")
    record = read(tmp_path)
    assert record["status"] == "failed" and "lower the learning rate" in record["error"]


NO_DROPOUT = [
    "+model.config_overrides.hidden_dropout_prob=0.0",
    "+model.config_overrides.attention_probs_dropout_prob=0.0",
    "method.dropout=0.0",
]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    data_dir()
    args = ["task=glue/mrpc", "method=melora", "method.n=4", "method.r=2", "task.epochs=2", "task.batch_size=8", *NO_DROPOUT]
    one = run_glue(tmp_path / "one", *args, "trainer.per_device_batch_size=4")  # accumulation 2
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [
        # accelerate's CPU mode with --cpu starts one process (it expects mpirun); its
        # multi-process launcher plus ACCELERATE_USE_CPU gives two gloo processes.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "melora.experiments.glue",
        f"hydra.run.dir={tmp_path / 'two'}", "profile=smoke", *args, "trainer.per_device_batch_size=4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    two = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read(tmp_path / "one"), read(tmp_path / "two")
    assert (a["gradient_accumulation"], b["gradient_accumulation"], b["num_processes"]) == (2, 1, 2)
    assert a["global_step"] == b["global_step"]
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]], rel=1e-4)
    wa = load_file(str(tmp_path / "one" / "checkpoint" / "adapter.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoint" / "adapter.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
