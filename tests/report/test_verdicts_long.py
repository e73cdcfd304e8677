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


def fake_verdicts_runs(root: Path, seeds=(0, 1), methods=("lora", "melora")) -> None:
    """Records of the verdicts spec's smoke profile (MRPC), as the dev-halves runs write them."""
    from omegaconf import OmegaConf

    for overrides, (mc, values) in SETTINGS.items():
        if mc["method"] not in methods:
            continue
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


LONG_CSV = (
    "task,method,epochs,chosen,lr,lr at grid edge,lrs tried,seeds,validation,test mean ± std,test 95% CI,"
    "Δ vs LoRA r=8 (paired),Δ 95% CI,verdict\n"
    'SST-2,LoRA r=8,2,-,3e-3,—,"1e-3, 3e-3, 1e-2",5,82.5,80.8 ± 0.2,"[79.4, 82.3]",—,—,reference\n'
    'SST-2,MELoRA r=1,2,n=8,3e-3,—,"1e-3, 3e-3, 1e-2",5,81.0,79.0 ± 0.5,"[78.0, 80.0]",-1.8,"[-3.0, -0.6]",worse\n'
    'SST-2,LoRA r=8,6,-,1e-3,—,"3e-4, 1e-3, 3e-3",5,83.0,81.5 ± 0.3,"[81.0, 82.0]",—,—,reference\n'
    'SST-2,MELoRA n=8 r=1,6,-,3e-3,—,"1e-3, 3e-3, 1e-2",{seeds},82.0,80.9 ± 0.4,"[80.0, 81.8]",-0.6,"[-1.5, 0.3]",{verdict}\n'
)


def test_the_headline_says_whether_longer_training_keeps_the_verdict(tmp_path):
    import csv
    import io

    from melora.experiments.report.headline import headline, longer_training

    rows = list(csv.DictReader(io.StringIO(LONG_CSV.format(seeds=5, verdict="no detectable difference"))))
    text = longer_training(rows, wanted=5)
    assert "Provisional" not in text
    assert ("- SST-2, MELoRA r=1 (n=8) against LoRA r=8: 2 epochs -1.8 [-3.0, -0.6] worse (lr 3e-3, 5 seeds); "
            "6 epochs -0.6 [-1.5, 0.3] no detectable difference (lr 3e-3, 5 seeds): the verdict changes.") in text
    rows[3]["verdict"] = "worse"
    assert text != longer_training(rows, wanted=5) and "worse (lr 3e-3, 5 seeds): the same verdict." in longer_training(rows, wanted=5)
    rows[3].update({"verdict": "too few seeds", "seeds": "1", "Δ vs LoRA r=8 (paired)": "—"})
    few = longer_training(rows, wanted=5)
    assert "6 epochs: too few seeds (1 seed): no verdict to compare yet." in few
    assert "Provisional: the longer runs are still being trained (1 of 2 lines with 5 seeds and a settled grid)." in few
    assert longer_training(rows[:2]) == ""  # only the default epochs: nothing to say

    table2 = tmp_path / "table2_verdicts.csv"
    table2.write_text("method,task,chosen,lr,lr at grid edge,lrs tried,seeds,validation,test mean ± std,test 95% CI,"
                      "Δ vs LoRA r=8 (paired),Δ 95% CI,verdict\n" + "\n".join(
                          line.replace("SST-2,LoRA r=8,2,", "LoRA r=8,SST-2,").replace("SST-2,MELoRA r=1,2,", "MELoRA r=1,SST-2,")
                          for line in LONG_CSV.splitlines()[1:3]) + "\n")
    assert "Does more training" not in headline(tmp_path)
    (tmp_path / "verdicts_long.csv").write_text(LONG_CSV.format(seeds=5, verdict="no detectable difference"))
    assert headline(tmp_path, 5).endswith("(lr 3e-3, 5 seeds): the verdict changes.\n")


def test_cost_counts_the_runs_a_waiting_row_will_need(tmp_path):
    from melora.experiments.sweep import spec_cost

    extra = [f"runs_root={tmp_path}"]
    # Smoke: MRPC, LoRA r=8 and MELoRA r=1, two seeds; each row runs at its chosen lr and the two neighbours.
    assert {k: spec_cost("verdicts_long", "smoke", extra)[k] for k in ("runs", "waiting")} == {"runs": 12, "waiting": 12}
    fake_verdicts_runs(tmp_path, seeds=(0,))
    fake_verdicts_runs(tmp_path, seeds=(1,), methods=("lora",))  # LoRA's choice settles; MELoRA's still waits
    assert {k: spec_cost("verdicts_long", "smoke", extra)[k] for k in ("runs", "waiting")} == {"runs": 12, "waiting": 6}
    fake_verdicts_runs(tmp_path, seeds=(1,), methods=("melora",))
    assert {k: spec_cost("verdicts_long", "smoke", extra)[k] for k in ("runs", "waiting")} == {"runs": 12, "waiting": 0}
