"""The longer-training spec takes each row's lr and n from the dev-halves Table 2, once that choice has settled."""

import json
from pathlib import Path

from melora.experiments import sweep

LRS = (1e-3, 3e-3, 1e-2)
# Validation metric per (method overrides, lr): LoRA peaks at 3e-3; MELoRA r=1 n=4 beats n=2 and n=8, peaking at 3e-3.
SETTINGS = {
    ("method=lora", "method.r=8"): ({"method": "lora", "n": 1, "r": 8}, {1e-3: 0.70, 3e-3: 0.80, 1e-2: 0.75}),
    ("method=melora", "method.r=8", "method.n=2"): ({"method": "melora", "n": 2, "r": 8}, {1e-3: 0.70, 3e-3: 0.79, 1e-2: 0.75}),
    ("method=melora", "method.r=1", "method.n=2"): ({"method": "melora", "n": 2, "r": 1}, {1e-3: 0.60, 3e-3: 0.70, 1e-2: 0.65}),
    ("method=melora", "method.r=1", "method.n=4"): ({"method": "melora", "n": 4, "r": 1}, {1e-3: 0.70, 3e-3: 0.82, 1e-2: 0.75}),
    ("method=melora", "method.r=1", "method.n=8"): ({"method": "melora", "n": 8, "r": 1}, {1e-3: 0.65, 3e-3: 0.75, 1e-2: 0.70}),
}


def fake_verdicts_runs(root: Path, seeds=(0, 1)) -> None:
    """Records of the verdicts spec's smoke profile (MRPC), as the dev-halves runs write them."""
    from omegaconf import OmegaConf

    for overrides, (mc, values) in SETTINGS.items():
        for lr, val in values.items():
            for seed in seeds:
                run = sweep.RunSpec("glue", ["profile=smoke", "model=minilm", "selection=dev_halves", "task=glue/mrpc", *overrides,
                                             f"task.lr={lr}", f"seed={seed}", f"runs_root={root}"])
                cfg = sweep.compose_run(run)
                Path(cfg.run_dir).mkdir(parents=True)
                record = {"kind": "glue", "task": "mrpc", "metric": "accuracy", "seed": seed, "model": "minilm", "profile": "smoke",
                          "selection": {"split": "dev_halves"}, "config": OmegaConf.to_container(cfg, resolve=True),
                          "method_config": mc, "status": "completed", "best_metric": val + 0.001 * seed,
                          "best_metrics": {"val_accuracy": val + 0.001 * seed, "test_accuracy": 0.5}}
                (Path(cfg.run_dir) / "record.json").write_text(json.dumps(record))


def long_runs(root: Path) -> list[tuple[str, str, float]]:
    runs = sweep.expand_specs(["verdicts_long"], "smoke", [f"runs_root={root}"])
    out = []
    for run in runs:
        get = {o.partition("=")[0]: o.partition("=")[2] for o in run.overrides}
        assert get["task.epochs"] == "6"
        out.append((get["method"], get.get("method.n", "-"), float(get["task.lr"])))
    return sorted(set(out))


def test_long_runs_wait_for_settled_choices_then_take_the_chosen_lr_and_n(tmp_path, capsys):
    assert long_runs(tmp_path) == []  # no records: every choice waits
    assert "choices of verdicts are not settled yet" in capsys.readouterr().out
    fake_verdicts_runs(tmp_path, seeds=(0,))
    assert long_runs(tmp_path) == []  # one of the two smoke seeds: still waiting
    fake_verdicts_runs(tmp_path, seeds=(1,))
    assert long_runs(tmp_path) == [("lora", "-", 1e-3), ("lora", "-", 3e-3), ("lora", "-", 1e-2),
                                   ("melora", "4", 1e-3), ("melora", "4", 3e-3), ("melora", "4", 1e-2)]
