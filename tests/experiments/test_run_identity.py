"""The committed mini records are still the runs today's configs describe: same resolved config, same identity.

A refactoring that changes what a spec's run resolves to (a new config key, a
renamed field, another default) would make every sweep retrain the committed
runs, or silently mix different runs in one table cell. Each committed record
under ``results/runs/mini`` whose run a spec still lists must hash to the
``config_hash`` it was recorded with.
"""

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from melora.experiments.runs import config_hash
from melora.experiments.scaffold import resolved
from melora.experiments.sweep import CONFIGS, ENTRIES, expand_specs

ROOT = Path(__file__).resolve().parents[2]
# Every STRIDE-th run: each method, task and spec is still among them, at a fifth of the composing time.
STRIDE = 5
SPECS = ["demo", "table2", "table4", "figure3", "figure4", "figure5", "lr_grid", "table3", "table5"]


def test_committed_records_keep_their_identity(monkeypatch):
    # The resolved config holds the data folder the runs read; compose with the one they recorded.
    first = next((ROOT / "results" / "runs" / "mini").rglob("record.json"))
    monkeypatch.setenv("MELORA_DATA_DIR", json.loads(first.read_text())["config"]["data_dir"])
    monkeypatch.chdir(ROOT)
    matched, changed = 0, []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):  # once: composing is then fast
        configs = [compose(ENTRIES[run.entry], overrides=[*run.overrides, "runs_root=runs"], return_hydra_config=True)
                   for run in expand_specs(SPECS, "mini")[::STRIDE]]
    for cfg in configs:
        run_dir = cfg.hydra.run.dir
        OmegaConf.set_struct(cfg, False)
        del cfg["hydra"]
        cfg.run_dir = run_dir
        path = ROOT / "results" / cfg.run_dir / "record.json"
        if not path.is_file():
            continue
        recorded = json.loads(path.read_text())["config_hash"]
        if config_hash(resolved(cfg)) == recorded:
            matched += 1
        else:
            changed.append(cfg.run_dir)
    assert changed == [], f"{len(changed)} committed runs changed identity, e.g. {changed[:3]}"
    assert matched >= 20  # the dev-protocol tables and the held-out grid
