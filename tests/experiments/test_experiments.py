"""Experiment specs: each expands to the runs its paper artifact needs, and those runs compose."""

import functools
import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from melora.experiments.report.figures import FIGURE3_BASELINE, FIGURE3_SETTINGS
from melora.experiments.report.paper import TABLES
from melora.experiments.report.records import BASE_TAG
from melora.experiments.scaffold import adapter_config
from melora.experiments.sweep import CONFIGS, EXPERIMENTS, compose_run, expand, load_spec

SPECS = ["table2", "table3", "table4", "table5", "figure3", "figure4", "figure5"]
PROFILES = ["paper", "mini", "smoke"]
PAPER_TASKS = {"mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"}
OFFLINE_TASKS = {"sst2", "mrpc", "cola", "stsb", "rte"}  # train + dev TSVs in the shared data folder
GLUE_DIRS = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "rte": "RTE"}

# tasks × settings × seeds
COUNTS = {
    "table2": {"paper": 8 * 10 * 5, "mini": 4 * 10, "smoke": 2 * 10},
    "table3": {"paper": 10 * 5, "mini": 4, "smoke": 2},
    "table4": {"paper": 8 * 6 * 5, "mini": 3 * 6, "smoke": 6},
    "table5": {"paper": 6 * 5, "mini": 6, "smoke": 2},
    "figure3": {"paper": 7 * 5, "mini": 7, "smoke": 7},
    "figure4": {"paper": 4 * 10 * 5, "mini": 3 * 10, "smoke": 10},
    "figure5": {"paper": 4 * 10 * 5, "mini": 3 * 10, "smoke": 10},
}


# The spec features these files use: profile-level `tasks` (for groups that name none)
# and a group-level `profiles` filter. A probe spec shows whether melora.experiments.sweep.expand has them.
PROBE = {"name": "probe", "entry": "glue", "profiles": {"mini": {"seeds": [0], "tasks": ["glue/rte"]}},
         "groups": [{"methods": [["method=lora"]]}, {"profiles": ["paper"], "methods": [["method=dylora"]]}]}


def runs(name: str, profile: str):
    if [r.overrides for r in expand(PROBE, "mini")] != [["profile=mini", "task=glue/rte", "method=lora", "seed=0"]]:
        pytest.fail("melora.experiments.sweep.expand does not read the profile-level `tasks` and the group `profiles` filter "
                    "that experiments/*.yaml use: in expand(), `if profile not in group.get('profiles', [profile]): "
                    "continue` and `tasks = group.get('tasks', prof.get('tasks', [None]))`")
    return expand(load_spec(name), profile)


def overrides_value(run, key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in run.overrides if o.startswith(f"{key}=")), None)


def method_tag(run) -> str:
    """The run's ``method.tag``, resolved from configs/method/<method>.yaml and the run's method.* overrides."""
    return OmegaConf.create({"method": _method_node(_method_overrides(run))}).method.tag


def method_label(run) -> str:
    """The label of the run's adapter config (what tables group by), from its method.* overrides."""
    node = OmegaConf.create(OmegaConf.to_container(_method_node(_method_overrides(run))))  # a copy: the node is cached
    node.target_modules, node.modules_to_save = ["query"], []
    del node["tag"]  # a folder name: not part of the config
    return adapter_config(node, total_steps=1000).label()


def _method_overrides(run) -> tuple[str, ...]:
    return tuple(o for o in run.overrides if o.startswith("method"))


@functools.lru_cache(maxsize=None)
def _method_node(method_overrides: tuple[str, ...]):
    name = next(o.split("=", 1)[1] for o in method_overrides if o.startswith("method="))
    node = OmegaConf.load(CONFIGS / "method" / f"{name}.yaml")
    for o in method_overrides:
        if o.startswith("method."):
            key, value = o.split("=", 1)
            OmegaConf.update(node, key.removeprefix("method."), yaml.safe_load(value))
    return node


@pytest.mark.parametrize("name", SPECS)
def test_spec_opens_with_its_make_command(name):
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert text.startswith(f"# make {name} PROFILE=mini   (= python -m melora.experiments.sweep {name} --profile mini, then\n"
                           f"#   python scripts/make_results.py --runs runs/mini --out results --only {name})\n")
    assert load_spec(name)["name"] == name
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert f"{name}: $(VENV)/.installed ##" in makefile, f"the Makefile has no `{name}` target"


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("profile", PROFILES)
def test_run_counts_seeds_and_models(name, profile):
    spec = load_spec(name)
    out = runs(name, profile)
    assert len(out) == COUNTS[name][profile]
    assert len({tuple(sorted(r.overrides)) for r in out}) == len(out)  # no run twice
    seeds = {overrides_value(r, "seed") for r in out}
    assert seeds == ({"0", "1", "2", "3", "4"} if profile == "paper" else {"0"})
    model = {"glue": {"paper": "roberta-base"}, "instruct": {"paper": "llama2-7b"}}[spec["entry"]].get(
        profile, "minilm" if spec["entry"] == "glue" else "smollm2-135m")
    assert {overrides_value(r, "model") for r in out} == {model}
    assert all(r.overrides[0] == f"profile={profile}" for r in out)
    if spec["entry"] == "glue":
        tasks = {overrides_value(r, "task").removeprefix("glue/") for r in out}
        if profile == "paper" and name in ("table2", "table4"):
            assert tasks == PAPER_TASKS
        if profile != "paper":
            assert tasks <= OFFLINE_TASKS, f"{name} at {profile} needs tasks that are not offline: {tasks - OFFLINE_TASKS}"


def test_mini_tasks_have_data():
    data_dir = os.environ.get("MELORA_DATA_DIR")
    if not data_dir:
        pytest.skip("MELORA_DATA_DIR is unset: point it at the shared data folder")
    for task in OFFLINE_TASKS:
        folder = Path(data_dir) / "glue" / GLUE_DIRS[task]
        assert (folder / "train.tsv").is_file() and (folder / "dev.tsv").is_file(), folder


def test_exact_override_lists():
    assert runs("table2", "paper")[0].overrides == ["profile=paper", "model=roberta-base", "task=glue/mnli", "method=lora", "method.r=8", "seed=0"]
    assert runs("table2", "mini")[-1].overrides == ["profile=mini", "model=minilm", "task=glue/stsb", "method=melora", "method.r=1", "method.n=8", "seed=0"]
    assert [r.overrides for r in runs("table4", "smoke")][3:] == [
        ["profile=smoke", "model=minilm", "task=glue/mrpc", "method=melora", "method.n=2", f"method.r={r}", "seed=0"] for r in (2, 4, 8)]
    assert runs("figure4", "mini")[0].overrides == ["profile=mini", "model=minilm", "task=glue/sst2", "method=lora", "method.r=2", "seed=0"]
    assert runs("table3", "paper")[-1].overrides == ["profile=paper", "model=llama2-7b", "method=melora", "method.r=1", "method.n=64", "seed=4"]
    assert [r.overrides for r in runs("table5", "smoke")] == [
        ["profile=smoke", "model=smollm2-135m", "method=lora", "method.r=16", "seed=0"],
        ["profile=smoke", "model=smollm2-135m", "method=melora", "method.n=2", "method.r=8", "seed=0"]]


def table_settings(name: str) -> set[str]:
    """The adapter settings a table reports (the base model's row is no run: the sweep evaluates it once)."""
    table = TABLES[name]([])
    return {t for row in table.rows for t in row.spec.settings} - {BASE_TAG}


@pytest.mark.parametrize("name,profile", [("table2", "paper"), ("table2", "smoke"), ("table4", "mini"), ("table3", "paper"), ("table5", "paper")])
def test_specs_run_exactly_the_settings_their_tables_report(name, profile):
    assert {method_label(r) for r in runs(name, profile)} == table_settings(name)


def test_figure_specs_cover_the_figure_settings():
    assert {method_label(r) for r in runs("figure3", "mini")} == {FIGURE3_BASELINE, *FIGURE3_SETTINGS}
    fig4 = {method_label(r) for r in runs("figure4", "paper")}
    assert fig4 == {f"LoRA r={r}" for r in (2, 4)} | {f"MELoRA n={n} r={r}" for n in (2, 4, 8, 16) for r in (2, 4)}
    fig5 = {method_label(r) for r in runs("figure5", "mini")}
    assert fig5 == {f"LoRA r={r}" for r in (1, 2, 4, 8, 16)} | {f"MELoRA n=2 r={r}" for r in (1, 2, 4, 8, 16)}


def sample(out: list) -> list:
    return [out[0], out[len(out) // 2], out[-1]] if len(out) > 2 else out


@pytest.mark.parametrize("name", [s for s in SPECS if s not in ("table3", "table5")])
def test_glue_runs_compose(name, tmp_path):
    for profile in PROFILES:
        for run in sample(runs(name, profile)):
            cfg = compose_run(run, [f"runs_root={tmp_path}"])
            task, model = overrides_value(run, "task").split("/")[1], overrides_value(run, "model")
            assert cfg.task.name == task and cfg.model.name == model and cfg.profile.name == profile
            assert cfg.method.tag == method_tag(run)
            assert cfg.run_dir == f"{tmp_path}/{profile}/glue-{task}/{model}/{cfg.method.tag}/seed{cfg.seed}"
            if cfg.method.name == "melora":  # MELoRA needs n | d_in, d_out; checked when the layer is built
                assert cfg.method.n in (1, 2, 4, 8, 16)


@pytest.mark.parametrize("name", ["table3", "table5"])
def test_instruct_runs_compose(name, tmp_path):
    if not (CONFIGS / "instruct.yaml").is_file():
        pytest.skip("configs/instruct.yaml does not exist yet: the instruction-tuning entry point is not wired")
    for profile in PROFILES:
        for run in sample(runs(name, profile)):
            cfg = compose_run(run, [f"runs_root={tmp_path}"])
            assert cfg.method.tag == method_tag(run) and cfg.profile.name == profile
            assert str(cfg.run_dir).startswith(f"{tmp_path}/{profile}/")


def test_several_specs_share_their_common_runs():
    from melora.experiments.sweep import expand_specs

    both = expand_specs(["demo", "table2"], "mini")
    assert len(runs("demo", "mini")) == 15 and len(runs("table2", "mini")) == 40
    assert len(both) == 43  # every demo run but RTE's three is a Table 2 run
    assert len({frozenset(r.overrides) for r in both}) == len(both)
    assert both[:15] == runs("demo", "mini")  # first-seen order


def test_scaling_study_gives_each_convention_its_own_folder(tmp_path):
    """scaling_grid: per_mini runs share Table 2's folders (their records are reused); equivalent ones never collide."""
    dirs = {}
    for run in runs("scaling_grid", "mini"):
        cfg = compose_run(run, [f"runs_root={tmp_path}"])
        dirs.setdefault(cfg.run_dir, set()).add(cfg.method.scaling)
    assert len(dirs) == 2 * 3 * 2 * 3  # tasks × n × conventions × lrs, one folder each
    assert all(len(conventions) == 1 for conventions in dirs.values())
    by_tag = {Path(d).parent.name: next(iter(conventions)) for d, conventions in dirs.items()}
    assert by_tag == {**{f"melora_n{n}_r1": "per_mini" for n in (2, 8, 16)},
                      **{f"melora_n{n}_r1_equivalent": "equivalent" for n in (2, 8, 16)}}
    table2 = compose_run(next(r for r in runs("lr_grid", "mini") if "method.n=8" in r.overrides and "task.lr=1e-3" in r.overrides),
                         [f"runs_root={tmp_path}"])
    assert table2.run_dir in dirs  # MELoRA r=1 n=8 at the default scaling: the very run Table 2's lr grid has


def test_spec_cost_sums_the_complete_runs_of_a_spec(tmp_path):
    import json

    from melora.experiments.sweep import cost_table, spec_cost

    every = runs("table4", "smoke")
    for run, minutes, status in zip(every, (2.0, 4.0, 3.0), ("completed", "completed", "failed")):
        folder = Path(compose_run(run, [f"runs_root={tmp_path}"]).run_dir)
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(json.dumps({"status": status, "wall_time_s": 60 * minutes}))
    cost = spec_cost("table4", "smoke", [f"runs_root={tmp_path}"])
    assert cost == {"spec": "table4", "runs": len(every), "complete": 2, "waiting": 0, "summed_min": 6.0, "median_min": 3.0}
    assert f"| table4 | {len(every)} | 2 | 0 | 0.1 h | 3.0 min |" in cost_table(["table4"], "smoke", [f"runs_root={tmp_path}"])


def test_config_differences_name_the_settings_and_skip_cosmetic_keys():
    from melora.experiments.runs import config_differences

    recorded = {"task": {"lr": 0.001, "epochs": 2}, "data_dir": "/a/data", "runs_root": "runs", "seed": 0}
    config = {"task": {"lr": 0.003, "epochs": 2}, "data_dir": "/b/data", "runs_root": "elsewhere", "seed": 0, "new": 1}
    assert config_differences(recorded, config) == ["data_dir=/a/data (recorded) vs /b/data", "new=<unset> (recorded) vs 1",
                                                    "task.lr=0.001 (recorded) vs 0.003"]


def test_a_grid_reads_records_trained_with_the_data_elsewhere():
    from melora.experiments.sweep import grid_key

    config = {"task": {"lr": 0.001, "epochs": 2}, "data_dir": "/a/data", "seed": 0, "run_dir": "x"}
    moved = {"task": {"lr": 0.003, "epochs": 2}, "data_dir": "/b/data", "seed": 1, "run_dir": "y"}
    assert grid_key(config) == grid_key(moved)
    assert grid_key(config) != grid_key({**config, "task": {"lr": 0.001, "epochs": 3}})


def test_a_run_folder_trained_with_the_data_elsewhere_says_how_to_resume_it(tmp_path):
    import json

    from melora.experiments.runs import config_hash
    from melora.experiments.scaffold import check_run_dir

    recorded = {"task": {"lr": 0.001}, "data_dir": "/a/data", "seed": 0}
    (tmp_path / "record.json").write_text(json.dumps({"config": recorded, "config_hash": config_hash(recorded), "status": "running"}))
    assert check_run_dir(tmp_path, recorded) is not None
    with pytest.raises(ValueError, match=r"data_dir=/a/data \(recorded\) vs /b/data\) \(the data folder .* MELORA_DATA_DIR"):
        check_run_dir(tmp_path, {**recorded, "data_dir": "/b/data"})
