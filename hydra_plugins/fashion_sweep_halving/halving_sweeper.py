"""Hydra's handle on `hydra/sweeper=halving` (conf/hydra/sweeper/halving.yaml); the logic is fashion_sweep.halving's.

hydra-core 1.3.8 instantiates a sweeper only from a class defined in a module under the hydra_plugins namespace
package ("Invalid plugin ... not the hydra_plugins package" otherwise), hence this thin class.
"""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class HalvingSweeper(Sweeper):
    """Successive halving over the jobs the basic sweeper would run, each rung through the configured launcher."""

    def __init__(self, eta: int, min_epochs: int, params: dict[str, str] | None = None) -> None:
        self.eta = eta
        self.min_epochs = min_epochs
        self.params = params
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from fashion_sweep import halving  # MLflow's import, only once a halving sweep runs: Hydra imports this
        # module to list its plugins on every start, `--help` included

        assert self.config is not None
        return halving.sweep(self.launcher, self.config, self.params, arguments, self.eta, self.min_epochs)
