"""The sweep-free control (control=sweep_free): beside a --multirun's grid, one schedule-free AdamW run of the same
model under the same parent, one per swept seed, so that the report can say what the sweep bought.

Owns which runs the control adds (the grid's shared overrides with the control's optimizer) and training them in the
sweeper's process once the grid has run. Its row, line and verdict in the report are compare.py's; the optimizer's
averaged weights schedule_free.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import configure_log
from omegaconf import DictConfig, OmegaConf, open_dict

from fashion_sweep import runs

SEED = "trainer.seed="


def jobs(config: DictConfig, grid: list[list[str]]) -> list[list[str]]:
    """The control's jobs: the overrides every grid job shares, but the optimizer's, with the control's optimizer and
    learning rate; one job per seed the grid sweeps (trainer.seed), else one."""
    chosen = config.get("control")
    if chosen is None or chosen.name == "none" or not grid:
        return []
    shared = set.intersection(*map(set, grid))
    kept = [o for o in grid[0] if o in shared and not o.lstrip("+~").startswith(("optimizer", "control="))]
    own = [f"optimizer={chosen.optimizer}", f"optimizer.lr={chosen.lr}", "optimizer.schedule=constant"]
    seeds = list(dict.fromkeys(o for job in grid for o in job if o.startswith(SEED) and o not in shared))
    return [[*kept, *own, seed] for seed in seeds] if seeds else [[*kept, *own]]


def run(config: DictConfig, controls: list[list[str]], first_number: int) -> None:
    """Train each control job here, as Hydra's basic launcher would run a job: its config composed from its
    overrides into a folder of its own under the sweep's, Hydra's runtime set for it, and runs.CONTROL_ENV telling
    train.py which control it is. Its parent is the sweep's (runs.PARENT_RUN_ENV, set for this process)."""
    from fashion_sweep import cli

    before = HydraConfig.instance().cfg
    os.environ.pop(runs.STOP_EPOCH_ENV, None)  # a halving sweep's last rung: the control trains all its epochs
    os.environ[runs.CONTROL_ENV] = str(config.control.name)
    try:
        for number, overrides in enumerate(controls, start=first_number):
            job = compose(config_name=config.hydra.job.config_name, overrides=overrides, return_hydra_config=True)
            folder = Path(str(config.hydra.sweep.dir)).absolute() / f"control-{number}"
            with open_dict(job):
                job.hydra.job.num = number
                job.hydra.runtime.output_dir = str(folder)
            (folder / ".hydra").mkdir(parents=True, exist_ok=True)
            HydraConfig.instance().set_config(job)
            configure_log(job.hydra.job_logging, job.hydra.verbose)  # its log lines and file, as a job's
            task = job.copy()
            with open_dict(task):
                del task["hydra"]
            OmegaConf.save(task, folder / ".hydra" / "config.yaml")
            OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
            cli.job(task, single=False)
    finally:
        os.environ.pop(runs.CONTROL_ENV, None)
        if before is not None:
            HydraConfig.instance().cfg = before
