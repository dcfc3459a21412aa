"""MLflow while training: the store and experiment, a run that always ends, and what a run records.

Owns every write to MLflow made by a training job; reading runs back is compare.py's job.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

# A --multirun's parent run id, set by sweep.MlflowSweep for its jobs (joblib's worker processes inherit it).
PARENT_RUN_ENV = "FASHION_SWEEP_PARENT_RUN_ID"
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")


def connect(cfg: DictConfig) -> str:
    """Point MLflow at cfg.uri, create the store and experiment if missing; return the experiment id."""
    uri = str(cfg.uri)
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


@contextmanager
def run(experiment_id: str, run_name: str, tags: dict[str, str]) -> Iterator[str]:
    """An active MLflow run, nested in the sweep's parent if any, that always ends: FINISHED, KILLED on
    Ctrl-C, FAILED (with the error and traceback.txt) otherwise."""
    parent_run_id = os.environ.get(PARENT_RUN_ENV)
    if parent_run_id:
        tags = {**tags, "sweep_id": parent_run_id}
    active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id, tags=tags)
    try:
        yield active.info.run_id
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


class EpochMetrics(keras.callbacks.Callback):
    """Logs Keras' epoch metrics plus lr and epoch_seconds to the active run, step = epoch (1, 2, ...)."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {name: float(value) for name, value in (logs or {}).items() if name in EPOCH_METRICS}
        metrics["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics["epoch_seconds"] = time.perf_counter() - self._started
        mlflow.log_metrics(metrics, step=epoch + 1)


def log_config(cfg: DictConfig, overrides: list[str]) -> None:
    """The resolved config as dotted params and as config.yaml; the command-line overrides as overrides.yaml."""
    mlflow.log_params(flat_params(cfg))
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    mlflow.log_text("".join(f"- {o}\n" for o in overrides) or "[]\n", "overrides.yaml")


def log_data_source(folder: Path, sha256: dict[str, str]) -> None:
    mlflow.set_tags({f"data_sha256.{name}": digest for name, digest in sha256.items()})
    mlflow.set_tag("data_dir", str(folder))


def log_model(model: keras.Model, example: np.ndarray, example_output: np.ndarray) -> None:
    """Log model as an MLflow Keras model with the signature of example -> example_output, linked to the run."""
    signature = infer_signature(example, example_output)
    # Explicit requirements: letting mlflow 3.17 infer them costs ~5 s per run; these are what loading needs.
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
    mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=requirements)
