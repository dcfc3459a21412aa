"""Successive halving over a sweep's jobs: the epochs of each rung, which jobs go on, and the rungs' launches.

Owns the rung schedule and the promotion rule; training is train.py's (a job trains up to its rung's epoch,
ends SCHEDULED, and later continues from its checkpoint); what the parent run records is parent.py's. Hydra's
plugin class is a thin shell in hydra_plugins/fashion_sweep_halving. Imports no TensorFlow: Hydra loads this
module to build its plugin list.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.launcher import Launcher
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fashion_sweep import hydra_internals, parent, progress, runs

log = logging.getLogger(__name__)

# Models paused at a rung in this process, by job key (runs.job_key): a survivor goes on with its model as it was
# at the rung, not rebuilt from its checkpoint and traced again (~1 s per launch). Only where the jobs run in the
# sweeper's own process (the basic launcher), which drops a job's model when it prunes the job, and all at the end.
kept_models: dict[str, tuple[int, Any]] = {}
keeping = False  # set by sweep() for its basic launcher


def keep_model(key: str, epoch: int, model: Any) -> None:
    """A job paused after epoch: its model stays in memory for its next rung (if the sweep runs its jobs here)."""
    if keeping:
        kept_models[key] = (epoch, model)


def kept_model(key: str, epoch: int) -> Any | None:
    """The model the job paused with at this epoch in this process, taken out; None if there is none."""
    epoch_kept, model = kept_models.pop(key, (None, None))
    return model if epoch_kept == epoch else None


def rungs(epochs: int, min_epochs: int, eta: int) -> list[int]:
    """The epochs at which jobs are compared: min_epochs, x eta, x eta^2, ... while a rung leaves at least a
    factor eta to the next, then `epochs` itself. rungs(10, 1, 3) == [1, 3, 10]; rungs(20, 2, 3) == [2, 6, 20]."""
    points = []
    epoch = min_epochs
    while epoch * eta <= epochs:
        points.append(epoch)
        epoch *= eta
    return [*points, epochs]


def survivors(results: Sequence[float], eta: int) -> list[int]:
    """Indices of the jobs that go on: the best ceil(n / eta) by result (lowest first), never a non-finite one
    (a diverged job is pruned at once)."""
    ranked = sorted((i for i, value in enumerate(results) if math.isfinite(value)), key=lambda i: results[i])
    return sorted(ranked[: math.ceil(len(results) / eta)])


def expand(params: dict[str, Any] | None, arguments: Sequence[str]) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper expands them: hydra.sweeper.params first, then the
    command line, key by key (a key given on the command line replaces the preset's list)."""
    lines = [*(f"{key}={value}" for key, value in (params or {}).items()), *arguments]
    return hydra_internals.basic_sweeper_jobs(OverridesParser.create().parse_overrides(lines))


def check_plan(jobs: list[list[str]], eta: int, min_epochs: int, epochs: int) -> None:
    """Refuse, in one line, settings successive halving cannot run."""
    if not (isinstance(eta, int) and eta >= 2):
        raise ValueError(f"hydra.sweeper.eta={eta} must be a whole number >= 2")
    if not (isinstance(min_epochs, int) and 1 <= min_epochs <= epochs):
        allowed = f"a whole number in [1, trainer.epochs={epochs}]"
        raise ValueError(f"hydra.sweeper.min_epochs={min_epochs} must be {allowed}")
    if len({o for job in jobs for o in job if o.lstrip("+").startswith("trainer.epochs=")}) > 1:
        raise ValueError("trainer.epochs sets the last rung of hydra/sweeper=halving; set it once, do not sweep it")


def stages(n: int, before: int, schedule: list[int], eta: int) -> list[tuple[int, int, int]]:
    """The rungs still to run after epoch `before`, as (jobs, from epoch, to epoch): ceil(n / eta) jobs go on at
    each, and a single job goes straight to the last epoch (nothing left to compare it with)."""
    planned = []
    for stop in [epoch for epoch in schedule if epoch > before]:
        stop = schedule[-1] if n == 1 else stop
        planned.append((n, before, stop))
        if stop == schedule[-1]:
            break
        n, before = math.ceil(n / eta), stop
    return planned


def sweep(launcher: Launcher, config: DictConfig, params: dict | None, arguments: list[str], eta: int, min_epochs: int):
    """Run the rungs: every job up to the first rung's epoch, then the best 1/eta of them to the next, and so on;
    the rest are pruned (their runs end FINISHED, tagged pruned and pruned_at_epoch). Returns Hydra's JobReturns."""
    global keeping
    keeping = str(config.hydra.launcher._target_).endswith(".BasicLauncher")
    try:
        return run_rungs(launcher, config, params, arguments, eta, min_epochs)
    finally:
        keeping = False
        kept_models.clear()


def run_rungs(launcher: Launcher, config: DictConfig, params: dict | None, arguments: list[str], eta: int,
              min_epochs: int):  # fmt: skip
    jobs = expand(params, arguments)
    epochs = int(config.trainer.epochs)
    check_plan(jobs, eta, min_epochs, epochs)
    schedule = rungs(epochs, min_epochs, eta)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")  # as the basic sweeper does
    client, parent_run_id = MlflowClient(str(config.tracking.uri)), os.environ.get(runs.PARENT_RUN_ENV)
    if parent_run_id:
        parent.record_rungs(client, parent_run_id, schedule)

    active, before, done, job_idx, returns, started = list(range(len(jobs))), 0, 0, 0, [], time.time()
    for rung in itertools.count(1):
        remaining = stages(len(active), before, schedule, eta)
        stop = remaining[0][2]
        stage = f"rung {rung}/{rung - 1 + len(remaining)}"
        total = done + sum(n * (to - start) for n, start, to in remaining)
        if parent_run_id:
            plan = progress.Plan(started, total, done, job_idx, [(before, stop)] * len(active), stage)
            parent.record_plan(client, parent_run_id, plan)
        log.info("Halving %s: %d jobs from epoch %d up to epoch %d", stage, len(active), before, stop)
        batch = [[*jobs[i], f"++hydra.job.env_set.{runs.STOP_EPOCH_ENV}={stop}"] for i in active]
        results = launcher.launch(batch, initial_job_idx=job_idx)  # a running index: job folders are not reused
        job_idx, done = job_idx + len(batch), done + len(batch) * (stop - before)
        returns.append(results)
        values = [float(result.return_value) for result in results]  # re-raises a failed job's error
        keep = [] if stop == epochs else survivors(values, eta)
        pruned = [jobs[active[i]] for i in range(len(active)) if i not in keep]
        for overrides in pruned:
            kept_models.pop(runs.job_key(overrides), None)
        if stop < epochs and parent_run_id:
            parent.prune(client, parent_run_id, pruned, stop)
        active, before = [active[i] for i in keep], stop
        if not active:
            return returns
