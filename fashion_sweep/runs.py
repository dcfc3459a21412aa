"""Runs in the MLflow store: the names a job and the store agree on, connecting, a run that always ends, which run
is a job's, how a run ended and whether its process still lives.

Owns every question about runs that needs no training code; it imports MLflow but never TensorFlow, so compare,
resume, the UI and the sweepers use it freely. What a training run records is tracking.py's; every write to a
sweep's parent run is parent.py's. docs/architecture.md lists the names below with what reads them.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import socket
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from fashion_sweep import store

# The environment a job reads (continuation.job_context), one meaning each.
PARENT_RUN_ENV = "FASHION_SWEEP_PARENT_RUN_ID"  # the sweep's parent run id, set by sweep.MlflowSweep for its jobs
RESUME_RUN_ENV = "FASHION_SWEEP_RESUME_RUN_ID"  # a single run that `fashion-sweep-resume` continues
RESUME_SWEEP_ENV = "FASHION_SWEEP_RESUME_SWEEP_ID"  # a sweep's parent run that `fashion-sweep-resume` continues
STOP_EPOCH_ENV = "FASHION_SWEEP_STOP_EPOCH"  # a halving rung: the job trains up to this epoch, then pauses
CONTROL_ENV = "FASHION_SWEEP_CONTROL"  # the control a job is, beside its sweep's grid (control.py): "sweep_free"

# The tags that continuing, comparing and resuming read (docs/records.md has every tag a run records).
JOB_KEY_TAG = "job_overrides"  # a sweep child's identity: its overrides, sorted, as JSON
LAUNCH_TAG = "launch"  # how to launch a run or sweep again (launch_record)
SWEEP_ID_TAG = "sweep_id"  # the parent run id, on the parent and on every child
SWEEP_ROLE_TAG = "sweep_role"  # "parent" on a sweep's parent run
DIVERGED_TAG = "diverged"  # "true" on a run stopped by the divergence guard (it ends FAILED)
PRUNED_TAG = "pruned"  # "true" on a halving child that stopped at a rung (it ends FINISHED)
PRUNED_AT_TAG = "pruned_at_epoch"  # the rung's epoch
HALVING_RUNGS_TAG = "halving_rungs"  # a halving sweep's rung epochs, "1,3,10", on the parent
ERROR_TAG = "error"  # a FAILED run's error, one line
CONTROL_TAG = "control"  # on a sweep's control run (control.py): "sweep_free"; never counted as the grid's best
TEST_SET_TAG = "test_set"  # a sweep's tracking.test_set, on its parent: who meets the test set (scoring.py)
TASK_TAG = "task"  # "lr_find" on an LR range test (never resumed)
NOTE_TAG = "mlflow.note.content"  # a run's description on its page in the MLflow UI (Markdown)
# MLflow 3.17's UI opens an experiment in its GenAI mode unless the experiment is tagged a model-training one (the
# tag alone does not change what a fresh browser opens; the address's workflowType does, see ui_address).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
LOCAL_UI = "http://127.0.0.1:5000"  # where fashion-sweep-ui serves a local store by default
FIRST_USE_LOCK_KEY = 0x66617368  # the PostgreSQL advisory lock that serializes a store's first use ("fash")
EPOCH_METRICS_TAG = "epoch_metrics"  # the metrics logged once per epoch (step = epoch), comma-separated
# What every run logged per epoch before it recorded EPOCH_METRICS_TAG (fashion-sweep before 2026-12-05).
EPOCH_METRICS_BEFORE_TAG = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")

last_run_id: str | None = None  # the run this process last opened, for the message after Ctrl-C


def connect(cfg: DictConfig) -> str:
    """Point MLflow at cfg.uri (conf/tracking), create the store and experiment if missing; return the experiment id."""
    uri = str(cfg.uri)
    if "request_retries" in cfg:  # a server: how long each request waits for it, explicit and bounded
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.request_retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(cfg.request_backoff)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.request_timeout)
    mlflow.set_tracking_uri(uri)
    with first_use(uri):  # the store's tables are created (or checked) here, one process at a time
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            location = Path(cfg.artifact_location).as_uri() if cfg.artifact_location else None
            try:
                return client.create_experiment(cfg.experiment, location, tags=dict([EXPERIMENT_KIND]))
            except MlflowException:
                experiment = client.get_experiment_by_name(cfg.experiment)  # a job through a server created it first
                if experiment is None:
                    raise
    kind, value = EXPERIMENT_KIND
    if experiment.tags.get(kind) != value:  # an experiment from before, or one MLflow took for GenAI
        client.set_experiment_tag(experiment.experiment_id, kind, value)
    return experiment.experiment_id


@contextmanager
def postgresql_lock(uri: str) -> Iterator[None]:
    """A PostgreSQL session-level advisory lock held while inside: one process creates or migrates the store, the
    others wait, then find its tables (released when the session ends, even if the process dies)."""
    import sqlalchemy  # MLflow's own dependency; only a database store needs it here

    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as session:
            session.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": FIRST_USE_LOCK_KEY})
            try:
                yield
            finally:
                session.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": FIRST_USE_LOCK_KEY})
    finally:
        engine.dispose()


def ui_address(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of a run (or of an experiment's runs) at base, in its model-training mode."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def ui_base(tracking_uri: str) -> str:
    """Where the MLflow UI of a store is: the server itself, or fashion-sweep-ui's default address."""
    return tracking_uri if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI


@contextmanager
def first_use(uri: str) -> Iterator[None]:
    """While inside, no other fashion-sweep process opens the store for the first time: MLflow 3.17 creates a new
    store by running its migrations, and processes doing that at once failed or left the store half-migrated
    ("table _alembic_tmp_tags already exists"). SQLite: an exclusive lock on a file beside the store, inside which a
    store left half-migrated is refused with how to recover; PostgreSQL: an advisory lock."""
    if uri.startswith("postgresql"):
        with postgresql_lock(uri):
            yield
        return
    if not uri.startswith("sqlite:///"):
        yield  # MySQL, MSSQL and servers: MLflow's own migrations, not serialized here
        return
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        store.check_not_half_migrated(path)
        yield


def error_summary(err: BaseException, limit: int = 300) -> str:
    """ "Type: message" on one line, without terminal colour codes, at most limit characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(err).__name__}: {err}")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def process_tags() -> dict[str, str]:
    """Where this process runs, and a heartbeat: what decides later whether a RUNNING run is still alive."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "heartbeat": datetime.now(UTC).isoformat()}


def heartbeat() -> None:
    """Tell later readers that the active run's process is alive now."""
    mlflow.set_tag("heartbeat", datetime.now(UTC).isoformat())


def launch_record(cwd: str, overrides: list[str], hydra_overrides: list[str], **more: str) -> str:
    """How to launch a run or sweep again (tag `launch`): where, with which task and Hydra overrides."""
    return json.dumps({"cwd": cwd, "overrides": list(overrides), "hydra_overrides": list(hydra_overrides), **more})


class Paused(Exception):
    """Raised inside run() by a job that stopped at a rung of a halving sweep: the run ends SCHEDULED, to be
    continued from its checkpoint or pruned."""

    def __init__(self, epoch: int, best_val_loss: float) -> None:
        super().__init__(f"paused after epoch {epoch}")
        self.epoch = epoch
        self.best_val_loss = best_val_loss


@contextmanager
def run(
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None,
    continued: str | None = None,
    system_metrics_interval: float | None = None,
) -> Iterator[str]:
    """An active MLflow run that always ends: FINISHED, KILLED on Ctrl-C, SCHEDULED when Paused, FAILED (with the
    error and traceback.txt) otherwise. A new run is nested in the sweep's parent, if any; `continued` reopens
    that run. With system_metrics_interval, MLflow's own sampler logs CPU, memory, disk and network every that many
    seconds (a reopened run continues its series)."""
    global last_run_id
    tags = {**tags, **process_tags()}
    sampling = system_metrics_interval is not None
    if sampling:
        mlflow.set_system_metrics_sampling_interval(system_metrics_interval)
    if continued:
        active = mlflow.start_run(run_id=continued, log_system_metrics=sampling)
        mlflow.set_tags(tags)
    else:
        if parent_run_id:
            tags[SWEEP_ID_TAG] = parent_run_id
        active = mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id, tags=tags,
            log_system_metrics=sampling,
        )  # fmt: skip
    last_run_id = active.info.run_id
    try:
        yield active.info.run_id
    except Paused:
        mlflow.end_run("SCHEDULED")
        raise
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            if status == "FAILED":  # the description: the error's own note (a diverged run's), or the error
                summary = error_summary(err)
                mlflow.set_tags({ERROR_TAG: summary, NOTE_TAG: getattr(err, "note", f"Failed: {summary}")})
                mlflow.log_text(traceback.format_exc(), "traceback.txt")
            else:
                mlflow.set_tag(NOTE_TAG, "Stopped (Ctrl-C or SIGTERM); `fashion-sweep-resume` continues it.")
        finally:
            mlflow.end_run(status)
        raise
    mlflow.end_run("FINISHED")


def job_key(overrides: list[str]) -> str:
    """A job's identity within its sweep: its overrides, sorted (tag job_overrides on its run)."""
    return json.dumps(sorted(overrides))


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """Every job run of a sweep (the nested children of its parent run)."""
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    return client.search_runs([experiment_id], query, max_results=10_000)


def job_run(client: MlflowClient, experiment_id: str, parent_run_id: str, key: str) -> Run | None:
    """The run this job of the sweep already has (to continue or to skip), or None for a job never started."""
    for child in child_runs(client, experiment_id, parent_run_id):
        if (child.data.tags.get(JOB_KEY_TAG) or legacy_job_key(child)) == key:
            return child
    return None


def legacy_job_key(run: Run) -> str:
    """The identity of a run written before job_overrides was recorded: its overrides.yaml artifact."""
    try:
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/overrides.yaml")
    except Exception:
        return ""
    return job_key([line.removeprefix("- ") for line in text.splitlines() if line.startswith("- ")])


def find_parent(client: MlflowClient, sweep: str | None) -> Run:
    """The parent run of a sweep, by sweep id (= parent run id) or parent run name; the latest if None. A name
    several sweeps share (stores written before names were made unique) is refused with the matches."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    parents = f"tags.{SWEEP_ROLE_TAG} = 'parent'"
    newest_first = ["attributes.start_time DESC"]
    if sweep is None:
        latest = client.search_runs(experiment_ids, parents, order_by=newest_first, max_results=1)
        if not latest:
            raise LookupError("no sweep in the store yet")
        return latest[0]
    if by_id := client.search_runs(experiment_ids, f"{parents} and tags.{SWEEP_ID_TAG} = '{sweep}'", max_results=1):
        return by_id[0]
    named = client.search_runs(experiment_ids, f"{parents} and attributes.run_name = '{sweep}'", order_by=newest_first)
    if len(named) > 1:
        matches = ", ".join(f"{run.info.run_id} ({run.info.status})" for run in named)
        raise LookupError(f"{len(named)} sweeps are named {sweep!r}: {matches}; name one by its id")
    if not named:
        raise LookupError(f"no sweep {sweep!r} in the store")
    return named[0]


def is_sweep(run: Run) -> bool:
    return run.data.tags.get(SWEEP_ROLE_TAG) == "parent"


def sweep_of(client: MlflowClient, run: Run) -> Run:
    """A sweep's job stands for its sweep; any other run for itself."""
    parent_id = run.data.tags.get("mlflow.parentRunId")
    return client.get_run(parent_id) if parent_id else run


def status_of(run: Run) -> str:
    """How a run ended, as the report and resume read it: DIVERGED, PRUNED, or MLflow's status."""
    if run.data.tags.get(DIVERGED_TAG) == "true":
        return "DIVERGED"
    if run.data.tags.get(PRUNED_TAG) == "true" and run.info.status == "FINISHED":
        return "PRUNED"
    return run.info.status


def is_done(run: Run) -> bool:
    """A result that needs no more training: FINISHED (pruned included), or diverged."""
    return status_of(run) in ("FINISHED", "PRUNED", "DIVERGED")


def best_val_loss(client: MlflowClient, run: Run, through: int | None = None) -> float:
    """What a job returns to Hydra: the lowest val_loss of its run (in epochs 1..through, if given), inf if it
    diverged or logged none."""
    if run.data.tags.get(DIVERGED_TAG) == "true":
        return math.inf
    history = client.get_metric_history(run.info.run_id, "val_loss")
    return min((m.value for m in history if through is None or m.step <= through), default=math.inf)


def epoch_metrics(run: Run) -> list[str]:
    """The names of the metrics a training run logs once per epoch: whatever Keras reported (the compiled metrics
    and their val_ twins) plus lr and epoch_seconds."""
    named = run.data.tags.get(EPOCH_METRICS_TAG)
    return named.split(",") if named else list(EPOCH_METRICS_BEFORE_TAG)


def logged_epochs(client: MlflowClient, run_id: str) -> list[int]:
    """The epochs (steps) a run has logged its training loss for."""
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def still_alive(client: MlflowClient, run: Run, now: float | None = None) -> str | None:
    """Why a RUNNING run may still be running (so it must not be resumed), or None if its process is gone.

    Same host: its pid is alive. Other host: its heartbeat is younger than 3 epochs (at least 5 minutes).
    """
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    if "host" not in tags or "heartbeat" not in tags:
        return f"run {run.info.run_id} is RUNNING and records no host or heartbeat (an older fashion-sweep)"
    if tags["host"] == socket.gethostname():
        if pid_alive(int(tags["pid"])):
            return f"run {run.info.run_id} is RUNNING in process {tags['pid']} on this host"
        return None
    age = (now or time.time()) - datetime.fromisoformat(tags["heartbeat"]).timestamp()
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
    stale_after = max(300.0, 3 * max(epochs, default=0.0))
    if age < stale_after:
        return f"run {run.info.run_id} on host {tags['host']} sent a heartbeat {age:.0f} s ago (< {stale_after:.0f} s)"
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
