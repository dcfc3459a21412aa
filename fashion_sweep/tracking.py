"""MLflow while training: the store and experiment, which run a job writes to, a run that always ends, and
what a run records (each epoch: checkpoint, then metrics).

Owns every write to MLflow made by a training job, finding a job's existing run and deciding whether it may be
reopened; reading a sweep back for its report is compare.py's job.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import subprocess
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.data.numpy_dataset import from_numpy
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.utils import requirements_utils
from omegaconf import DictConfig, OmegaConf

from fashion_sweep import checkpoint, data

# A --multirun's parent run id, set by sweep.MlflowSweep for its jobs (joblib's worker processes inherit it).
PARENT_RUN_ENV = "FASHION_SWEEP_PARENT_RUN_ID"
# The run (or, for a --multirun, the sweep's parent run) that `fashion-sweep-resume` asks this launch to continue.
RESUME_RUN_ENV = "FASHION_SWEEP_RESUME_RUN_ID"
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")
last_run_id: str | None = None  # the run this process last opened, for the message after Ctrl-C


def connect(cfg: DictConfig) -> str:
    """Point MLflow at cfg.uri, create the store and experiment if missing; return the experiment id."""
    uri = str(cfg.uri)
    if "request_retries" in cfg:  # a server: how long each request waits for it, explicit and bounded
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.request_retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(cfg.request_backoff)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.request_timeout)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        location = Path(cfg.artifact_location).as_uri() if cfg.artifact_location else None
        try:
            return client.create_experiment(cfg.experiment, artifact_location=location)
        except MlflowException:
            experiment = client.get_experiment_by_name(cfg.experiment)  # a concurrent job created it first
            if experiment is None:
                raise
    return experiment.experiment_id


def error_summary(err: BaseException, limit: int = 300) -> str:
    """ "Type: message" on one line, without terminal colour codes, at most limit characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(err).__name__}: {err}")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def process_tags() -> dict[str, str]:
    """Where this process runs, and a heartbeat: what decides later whether a RUNNING run is still alive."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "heartbeat": datetime.now(UTC).isoformat()}


def launch_record(cwd: str, overrides: list[str], hydra_overrides: list[str], **more: str) -> str:
    """How to launch a run or sweep again (tag `launch`): where, with which task and Hydra overrides."""
    return json.dumps({"cwd": cwd, "overrides": list(overrides), "hydra_overrides": list(hydra_overrides), **more})


def job_key(overrides: list[str]) -> str:
    """A job's identity within its sweep: its overrides, sorted (tag job_overrides on its run)."""
    return json.dumps(sorted(overrides))


def job_run(client: MlflowClient, experiment_id: str, parent_run_id: str, key: str) -> Run | None:
    """The run this job of the sweep already has (to continue or to skip), or None for a job never started."""
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    for child in client.search_runs([experiment_id], query, max_results=10_000):
        if (child.data.tags.get("job_overrides") or legacy_job_key(client, child)) == key:
            return child
    return None


def legacy_job_key(client: MlflowClient, run: Run) -> str:
    """The identity of a run written before job_overrides was recorded: its overrides.yaml artifact."""
    try:
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/overrides.yaml")
    except Exception:
        return ""
    return job_key([line.removeprefix("- ") for line in text.splitlines() if line.startswith("- ")])


def is_done(run: Run) -> bool:
    """A result that needs no more training: FINISHED, or diverged (a FAILED run tagged diverged=true)."""
    return run.info.status == "FINISHED" or run.data.tags.get("diverged") == "true"


def best_val_loss(client: MlflowClient, run: Run, through: int | None = None) -> float:
    """What a job returns to Hydra: the lowest val_loss of its run (in epochs 1..through, if given), inf if it
    diverged or logged none."""
    if run.data.tags.get("diverged") == "true":
        return math.inf
    history = client.get_metric_history(run.info.run_id, "val_loss")
    return min((m.value for m in history if through is None or m.step <= through), default=math.inf)


class Paused(Exception):
    """Raised inside run() by a job that stopped at a rung of a halving sweep: the run ends SCHEDULED, to be
    continued from its checkpoint or pruned."""

    def __init__(self, epoch: int, best_val_loss: float) -> None:
        super().__init__(f"paused after epoch {epoch}")
        self.epoch = epoch
        self.best_val_loss = best_val_loss


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


@contextmanager
def run(experiment_id: str, run_name: str, tags: dict[str, str], continued: str | None = None) -> Iterator[str]:
    """An active MLflow run that always ends: FINISHED, KILLED on Ctrl-C, SCHEDULED when Paused, FAILED (with the
    error and traceback.txt) otherwise. A new run is nested in the sweep's parent, if any; `continued` reopens
    that run."""
    global last_run_id
    parent_run_id = os.environ.get(PARENT_RUN_ENV)
    tags = {**tags, **process_tags()}
    if continued:
        active = mlflow.start_run(run_id=continued)
        mlflow.set_tags(tags)
    else:
        if parent_run_id:
            tags["sweep_id"] = parent_run_id
        active = mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id, tags=tags
        )
    last_run_id = active.info.run_id
    try:
        yield active.info.run_id
    except Paused:
        mlflow.end_run("SCHEDULED")
        raise
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            if status == "FAILED":
                mlflow.set_tag("error", error_summary(err))
                mlflow.log_text(traceback.format_exc(), "traceback.txt")
        finally:
            mlflow.end_run(status)
        raise
    mlflow.end_run("FINISHED")


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as {"optimizer.lr": "0.001", ...}; lists stay whole ("[32, 64]")."""
    params: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            params[prefix.rstrip(".")] = str(node)

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return params


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, if it runs from one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class EpochRecorder(keras.callbacks.Callback):
    """Records each epoch to the active run, step = epoch (1, 2, ...): first a checkpoint (weights, optimizer and
    random state, the history so far), then Keras' epoch metrics plus lr and epoch_seconds, then a heartbeat.

    A resumed run starts from the newest whole checkpoint, whose history holds every epoch it covers, so each
    epoch's metrics are logged exactly once even if the process dies between the two writes.
    """

    def __init__(self, history: dict[str, list[float]], fit_seconds_before: float) -> None:
        super().__init__()
        self.history = history  # every epoch so far, this fit's and those before a resume
        self.fit_seconds_before = fit_seconds_before  # seconds inside model.fit before a resume
        self.fit_seconds = fit_seconds_before  # seconds inside model.fit, all fits of the run together

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._fit_started = time.perf_counter()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.fit_seconds = self.fit_seconds_before + time.perf_counter() - self._fit_started

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {name: float(value) for name, value in (logs or {}).items() if name in EPOCH_METRICS}
        metrics["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics["epoch_seconds"] = time.perf_counter() - self._started
        self.fit_seconds = self.fit_seconds_before + time.perf_counter() - self._fit_started
        for name, value in metrics.items():
            self.history.setdefault(name, []).append(value)
        log_checkpoint(checkpoint.capture(self.model, epoch + 1, self.history, self.fit_seconds))
        mlflow.log_metrics(metrics, step=epoch + 1)
        mlflow.set_tag("heartbeat", datetime.now(UTC).isoformat())


def log_checkpoint(state: checkpoint.Checkpoint) -> None:
    """Write state into one of two artifact slots, then point the tag `checkpoint` at it: a process killed while
    writing leaves the tag on the previous, whole checkpoint."""
    path = f"checkpoint/slot-{state.epoch % 2}.npz"
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / Path(path).name
        digest = checkpoint.save(state, local)
        mlflow.log_artifact(str(local), "checkpoint")
    mlflow.set_tags({"checkpoint": path, "checkpoint_epoch": str(state.epoch), "checkpoint_sha256": digest})


def load_checkpoint(run: Run) -> checkpoint.Checkpoint | None:
    """The newest whole checkpoint of run (checked against its SHA-256), or None if it has none."""
    tags = run.data.tags
    if "checkpoint" not in tags:
        return None
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/{tags['checkpoint']}", dst_path=folder)
        return checkpoint.load(Path(local), tags["checkpoint_sha256"])


def logged_epochs(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def log_config(cfg: DictConfig, overrides: list[str]) -> None:
    """The resolved config as dotted params and as config.yaml; the command-line overrides as overrides.yaml."""
    mlflow.log_params(flat_params(cfg))
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    mlflow.log_text("".join(f"- {o}\n" for o in overrides) or "[]\n", "overrides.yaml")


def log_data_source(folder: Path, sha256: dict[str, str]) -> None:
    mlflow.set_tags({f"data_sha256.{name}": digest for name, digest in sha256.items()})
    mlflow.set_tag("data_dir", str(folder))


def log_datasets(split: data.Split, folder: Path, sha256: dict[str, str], data_cfg: DictConfig, seed: int) -> None:
    """The run's training, validation and test images as MLflow dataset inputs (the UI's Dataset column):
    Fashion-MNIST, with a digest of the files' SHA-256 and the slice, so equal digests mean equal images."""
    slices = {
        "training": (split.x_train, split.y_train),
        "validation": (split.x_val, split.y_val),
        "test": (split.x_test, split.y_test),
    }
    for context, (images, labels) in slices.items():
        how = {} if context == "test" else {"val_fraction": data_cfg.val_fraction, "train_size": data_cfg.train_size}
        key = json.dumps({"files": sha256, "slice": context, **how, "seed": seed if how else None}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        with warnings.catch_warnings():  # mlflow 3.17 registers "" and "file" as two local sources, then warns
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            dataset = from_numpy(images, targets=labels, source=str(folder), name="fashion-mnist", digest=digest)
        log_input(dataset, context)


def log_input(dataset: Any, context: str) -> None:
    """mlflow.log_input, once more if it lost a race: mlflow 3.17's SQL store looks the dataset up, then inserts
    it, so parallel jobs logging the same new dataset at once can fail with a unique-constraint error (seen on Ray
    through the server); the second try finds the winner's row and links it."""
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as err:
        message = str(err).lower()
        if "unique constraint" not in message and "duplicate" not in message:
            raise
        mlflow.log_input(dataset, context=context)


def log_model(model: keras.Model, example: np.ndarray, example_output: np.ndarray) -> None:
    """Log model as an MLflow Keras model with the signature of example -> example_output, linked to the run."""
    signature = infer_signature(example, example_output)
    # Explicit requirements: letting mlflow 3.17 infer them costs ~5 s per run; these are what loading needs.
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
    with requirements_checked_by_name():
        mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=requirements)


@contextmanager
def requirements_checked_by_name() -> Iterator[None]:
    """While inside, mlflow checks a model's pip requirements against this environment without first mapping
    every installed package's modules (importlib.metadata.packages_distributions(): ~0.3 s once per process on
    an AMD EPYC). mlflow 3.17 builds that map before the check although it looks each requirement up by its
    distribution name first, which finds ours (tensorflow, keras, mlflow); requirements_utils has no public switch."""
    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", {}) is not None:  # built already (or mlflow changed)
        yield
        return
    requirements_utils._MODULES_TO_PACKAGES = {}  # type: ignore[assignment]  # mlflow declares it None until built
    try:
        yield
    finally:
        requirements_utils._MODULES_TO_PACKAGES = None  # a later requirement inference builds the real map
