"""Learning-rate grids that bracket: the 1-3 ladder, when a grid is extended, and the sweep that extends it."""

import json
import math
from pathlib import Path

import pytest

from melora.experiments.report.bracket import bracket, ladder_step


def test_ladder_steps_by_about_three():
    assert ladder_step(1e-3, up=True) == 3e-3 and ladder_step(3e-3, up=True) == 1e-2
    assert ladder_step(1e-2, up=True) == 3e-2 and ladder_step(1e-3, up=False) == 3e-4
    assert ladder_step(3e-4, up=False) == 1e-4 and ladder_step(2e-3, up=True) == 3e-3  # off the ladder: the next rung
    with pytest.raises(ValueError):
        ladder_step(0.0, up=True)


def grid(means_by_lr, seeds=(0, 1, 2)):
    """``{lr: {seed: value}}`` with every seed at ``mean + small seed noise`` (mean over seeds unchanged)."""
    noise = {0: -0.01, 1: 0.0, 2: 0.01}
    return {lr: {s: (None if m is None else m + noise[s]) for s in seeds} for lr, m in means_by_lr.items()}


def test_interior_best_needs_nothing_more():
    b = bracket(grid({1e-3: 0.70, 3e-3: 0.80, 1e-2: 0.75}))
    assert b.status == "interior" and b.best_lr == 3e-3 and b.next_lr is None and b.edge == "" and b.reason == ""
    assert b.seeds == (0, 1, 2) and b.means[3e-3] == pytest.approx(0.80)


def test_best_at_an_edge_extends_that_side():
    top = bracket(grid({1e-3: 0.70, 3e-3: 0.75, 1e-2: 0.80}))
    assert (top.status, top.edge, top.next_lr) == ("extend", "top", 3e-2)
    bottom = bracket(grid({1e-3: 0.80, 3e-3: 0.75, 1e-2: 0.70}))
    assert (bottom.status, bottom.edge, bottom.next_lr) == ("extend", "bottom", 3e-4)
    assert "being extended" in top.reason


def test_collapsed_runs_rank_lowest_so_the_grid_closes():
    """A diverged run (None) or an undefined correlation (NaN) at the new top lr brackets the optimum."""
    b = bracket(grid({1e-3: 0.70, 3e-3: 0.75, 1e-2: 0.80, 3e-2: None}))
    assert b.status == "interior" and b.best_lr == 1e-2 and b.means[3e-2] == -math.inf
    nan = bracket({1e-3: {0: 0.5}, 3e-3: {0: 0.6}, 1e-2: {0: float("nan")}})
    assert nan.status == "interior" and nan.best_lr == 3e-3


def test_limits_and_flat_grids_stop_with_a_reason():
    b = bracket(grid({0.03: 0.5, 0.1: 0.6, 0.3: 0.7}), max_lr=0.3)
    assert b.status == "limit" and b.edge == "top" and b.next_lr is None and "grid limit" in b.reason
    flat = bracket(grid({1e-3: 0.65, 3e-3: 0.65, 1e-2: 0.60}))  # the majority class at the two low lrs
    assert flat.status == "flat" and flat.best_lr == 1e-3 and "ties its neighbour" in flat.reason


def test_means_use_the_seeds_every_lr_has_and_incomplete_grids_wait():
    values = {1e-3: {0: 0.70, 1: 0.70}, 3e-3: {0: 0.80, 1: 0.60}, 1e-2: {0: 0.75}}
    b = bracket(values)  # seed 1 is missing at 1e-2: compared on seed 0 alone
    assert b.seeds == (0,) and b.best_lr == 3e-3 and b.status == "interior"
    assert bracket({1e-3: {0: 0.7}, 3e-3: {}}).status == "incomplete"
    assert bracket({1e-3: {0: 0.7}, 3e-3: {1: 0.8}}).status == "incomplete"
    assert bracket({}).status == "incomplete"


def fake_record(tmp_path, lr, seed, val, test, diverged=False):
    from omegaconf import OmegaConf

    from melora.experiments import sweep

    run = sweep.RunSpec("glue", ["profile=smoke", "model=minilm", "selection=dev_halves", "task=glue/mrpc", "method=lora",
                                 "method.r=8", f"task.lr={lr}", f"seed={seed}", f"runs_root={tmp_path}"])
    cfg = sweep.compose_run(run)
    Path(cfg.run_dir).mkdir(parents=True)
    record = {"kind": "glue", "task": "mrpc", "metric": "accuracy", "seed": seed, "selection": {"split": "dev_halves"},
              "config": OmegaConf.to_container(cfg, resolve=True), "method_config": {"method": "lora", "n": 1, "r": 8}}
    if diverged:
        record |= {"status": "failed", "diverged": True}
    else:
        record |= {"status": "completed", "best_metric": val, "best_metrics": {"val_accuracy": val, "test_accuracy": test}}
    (Path(cfg.run_dir) / "record.json").write_text(json.dumps(record))


def lora_runs(tmp_path, seeds=1):
    from melora.experiments import sweep

    runs = sweep.expand_specs(["verdicts"], "smoke", [f"runs_root={tmp_path}"], seeds=seeds)
    return [r for r in runs if "method=lora" in r.overrides]


def lrs(runs):
    return sorted(float(o.partition("=")[2]) for r in runs for o in r.overrides if o.startswith("task.lr="))


def test_sweep_extends_a_grid_whose_best_sits_at_an_edge_and_keeps_the_extension(tmp_path):
    assert lrs(lora_runs(tmp_path)) == [1e-3, 3e-3, 1e-2]  # no records: the starting grid
    fake_record(tmp_path, 1e-3, 0, 0.60, 0.99)
    fake_record(tmp_path, 3e-3, 0, 0.70, 0.10)
    assert lrs(lora_runs(tmp_path)) == [1e-3, 3e-3, 1e-2]  # 1e-2 not run yet: no extension
    fake_record(tmp_path, 1e-2, 0, 0.80, 0.10)
    assert lrs(lora_runs(tmp_path)) == [1e-3, 3e-3, 1e-2, 3e-2]  # best at the top: one step up
    assert lrs(lora_runs(tmp_path, seeds=2)) == [1e-3, 1e-3, 3e-3, 3e-3, 1e-2, 1e-2, 3e-2, 3e-2]  # every seed at the new lr
    fake_record(tmp_path, 3e-2, 0, None, None, diverged=True)
    assert lrs(lora_runs(tmp_path)) == [1e-3, 3e-3, 1e-2, 3e-2]  # collapsed above: bracketed, 3e-2 stays in the grid


def test_test_half_metrics_never_change_an_extension(tmp_path):
    """The same validation values with opposite test-half values give the same grid."""
    for root, tests in ((tmp_path / "a", (0.1, 0.2, 0.9)), (tmp_path / "b", (0.9, 0.2, 0.1))):
        for lr, val, test in zip((1e-3, 3e-3, 1e-2), (0.8, 0.7, 0.6), tests):
            fake_record(root, lr, 0, val, test)
    assert lrs(lora_runs(tmp_path / "a")) == lrs(lora_runs(tmp_path / "b")) == [3e-4, 1e-3, 3e-3, 1e-2]


def test_cost_counts_a_grids_extensions_as_runs_not_as_negative_waiting(tmp_path):
    from melora.experiments.sweep import expand, load_spec, spec_cost

    for lr, val in ((1e-3, 0.60), (3e-3, 0.70), (1e-2, 0.80)):
        fake_record(tmp_path, lr, 0, val, 0.5)
    cost = spec_cost("verdicts", "smoke", [f"runs_root={tmp_path}"])
    extension = len(load_spec("verdicts")["profiles"]["smoke"]["seeds"])  # LoRA's setting gets 3e-2 at every seed
    assert cost["waiting"] == 0
    assert cost["runs"] == len(expand(load_spec("verdicts"), "smoke")) + extension
