"""``hydra/sweeper=spec``: a Hydra multirun over the runs an experiment spec needs.

    python -m melora.experiments.glue -m hydra/sweeper=spec hydra.sweeper.specs=[table2] hydra.sweeper.profile=mini \
        hydra/launcher=local hydra.launcher.n_jobs=2          # or hydra/launcher=slurm on a cluster

The sweeper expands ``experiments/<spec>.yaml`` (``melora.experiments.sweep.expand_specs``),
leaves out the runs whose record is complete, and hands the rest to the
configured launcher, one job per run, each with the command line's other
overrides. Hydra requires sweeper plugins to live in the ``hydra_plugins``
namespace; the logic is in ``melora.experiments.sweep``.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class SpecSweeperConf:
    _target_: str = "hydra_plugins.melora_sweeper.spec_sweeper.SpecSweeper"
    # Not `from __future__ import annotations`: Hydra loads plugin modules outside sys.modules, where dataclasses cannot resolve strings.
    specs: List[str] = field(default_factory=lambda: [MISSING])  # experiments/<name>.yaml
    profile: str = "mini"  # paper | mini | smoke
    threads_per_job: Optional[int] = None  # torch threads of each local job; null: cores / launcher.n_jobs
    list_only: bool = False  # print the runs that would be launched, launch nothing
    seeds: Optional[int] = None  # only the first k seeds of each spec's profile (a seed wave); null: all


ConfigStore.instance().store(group="hydra/sweeper", name="spec", node=SpecSweeperConf, provider="melora")


class SpecSweeper(Sweeper):
    def __init__(self, specs: List[str], profile: str, threads_per_job: Optional[int] = None, list_only: bool = False,
                 seeds: Optional[int] = None) -> None:
        self.specs, self.profile, self.threads_per_job, self.list_only, self.seeds = list(specs), profile, threads_per_job, list_only, seeds
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from melora.experiments.sweep import sweep_specs

        return sweep_specs(self, list(arguments))
