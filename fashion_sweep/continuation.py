"""Continuing a job: its context read from its environment, the run it already has, and where it goes on from.

Owns the one path that resume, halving survivors and retried cluster jobs share (docs/architecture.md, "Continuing a
job"): a job's identity is its overrides within its sweep; if that run is done it is answered from the store, else
it is reopened and trained on from its newest whole checkpoint, each epoch logged once. The names of the variables
and tags are runs.py's; the checkpoint's format and slots are checkpoint.py's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from hydra.core.hydra_config import HydraConfig
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from fashion_sweep import backend, checkpoint, runs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What a job knows of its place: read once, from Hydra and the environment, by job_context."""

    overrides: list[str]  # its Hydra task overrides: its identity within its sweep (tag job_overrides)
    number: int  # Hydra's job number (hydra.job.num), 0 for a single run
    parent_run_id: str | None  # its sweep's parent run (runs.PARENT_RUN_ENV); None for a single run
    resume_run_id: str | None  # the single run fashion-sweep-resume continues (runs.RESUME_RUN_ENV)
    stop_epoch: int  # the epoch it trains up to: trainer.epochs, or its halving rung (runs.STOP_EPOCH_ENV)
    output_dir: str | None  # Hydra's output folder of the job
    control: str | None  # the control it is beside its sweep's grid (runs.CONTROL_ENV), e.g. sweep_free; else None
    launch: str | None  # how to launch a single run again (tag launch); a sweep's is on its parent


def job_context(epochs: int) -> Job:
    """This job's context: Hydra's runtime (if Hydra runs it) and the environment variables of runs.py."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    overrides = list(hydra.overrides.task) if hydra else []
    parent_run_id = os.environ.get(runs.PARENT_RUN_ENV)
    launch = None
    if hydra is not None and parent_run_id is None:
        launch = runs.launch_record(hydra.runtime.cwd, overrides, list(hydra.overrides.hydra))
    return Job(
        overrides=overrides,
        number=int(hydra.job.num) if hydra and parent_run_id else 0,
        parent_run_id=parent_run_id,
        resume_run_id=os.environ.get(runs.RESUME_RUN_ENV),
        stop_epoch=min(int(os.environ.get(runs.STOP_EPOCH_ENV, epochs)), epochs),
        output_dir=hydra.runtime.output_dir if hydra else None,
        control=os.environ.get(runs.CONTROL_ENV) if parent_run_id else None,
        launch=launch,
    )


def existing_run(client: MlflowClient, experiment_id: str, job: Job) -> Run | None:
    """The run this job continues or skips: its sweep's child with the same overrides, or the run that
    fashion-sweep-resume names; None for a new run."""
    if job.parent_run_id:
        return runs.job_run(client, experiment_id, job.parent_run_id, runs.job_key(job.overrides))
    if job.resume_run_id:
        return client.get_run(job.resume_run_id)
    return None


def answered_by(client: MlflowClient, run: Run | None, job: Job, epochs: int) -> bool:
    """Whether the store already holds this job's answer: its run is done, or (its halving sweep resumed) it has
    trained past the rung asked for."""
    if run is None:
        return False
    past_rung = job.stop_epoch < epochs and len(runs.logged_epochs(client, run.info.run_id)) >= job.stop_epoch
    return runs.is_done(run) or past_rung


@dataclass(frozen=True)
class ResumePoint:
    """Where a reopened run goes on from."""

    state: checkpoint.Checkpoint | None  # the newest whole checkpoint (None: from the start)
    logged: frozenset[int]  # the epochs the store holds metrics for: not logged again


def resume_point(client: MlflowClient, previous: Run) -> ResumePoint:
    """The checkpoint to continue from, read before the run is reopened (a refusal leaves its status as it was);
    logs the epochs the checkpoint holds that the store lacks (a death between the two writes)."""
    state = checkpoint.load_from_run(previous)
    logged = runs.logged_epochs(client, previous.info.run_id)
    written = max(state.epoch if state else 0, int(previous.data.tags.get("checkpoint_epoch", 0)))
    if any(step > written for step in logged):
        raise checkpoint.CheckpointError(
            f"run {previous.info.run_id} logged epochs up to {max(logged)} but its checkpoint holds {written}; "
            "it was written by a fashion-sweep without checkpoints and cannot be continued"
        )
    covered = state.epoch if state else 0
    missing = [epoch for epoch in range(1, covered + 1) if epoch not in logged]
    for epoch in missing:
        assert state is not None
        for name, values in state.history.items():
            client.log_metric(previous.info.run_id, name, values[epoch - 1], step=epoch)
    if state:
        log.info("Continuing run %s from its checkpoint after epoch %d", previous.info.run_id, state.epoch)
    return ResumePoint(state, frozenset([*logged, *missing]))


def run_precision(setting: str, previous: Run | None) -> tuple[str, str]:
    """(precision, why) to train in. Under auto a continued run keeps the precision it began in (auto's rule, or
    the CPU, may have changed since); runs from before trainer.precision existed began in float32."""
    tags = previous.data.tags if previous else {}
    if previous is None or setting not in ("auto", tags.get("precision")):
        return backend.precision_here(setting)
    if "precision" not in tags:
        return "float32", "auto: kept from the run's start (written before trainer.precision, in float32)"
    return tags["precision"], tags.get("precision_reason", "auto: kept from the run's start")


def pin_precision(cfg: DictConfig, previous: Run | None) -> bool:
    """Under trainer.precision=auto, set in cfg the precision a continued run began in where this CPU would pick
    another, so that a preset's values chosen by precision (${by_precision:...}, experiment=best_cnn) resolve as
    when the run began. Whether cfg changed."""
    if previous is None or cfg.trainer.precision != "auto":
        return False
    kept = run_precision("auto", previous)[0]
    if kept == backend.precision_here("auto")[0]:
        return False
    cfg.trainer.precision = kept
    return True
