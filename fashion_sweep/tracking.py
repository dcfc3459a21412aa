"""What a training run records in MLflow: its tags, its config as params, its data as dataset inputs, its model.

Owns those writes to the active run (docs/records.md lists them); which run is active, and how it ends, is
runs.py's; the per-epoch metrics and checkpoints are written by callbacks.py, the parent run's records by parent.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.data.numpy_dataset import from_numpy
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from omegaconf import DictConfig, OmegaConf

from fashion_sweep import config, data, mlflow_internals, runs
from fashion_sweep.continuation import Job


def run_tags(job: Job) -> dict[str, str]:
    """The tags a job's run starts with: its identity, the control it is (if it is one), where Hydra wrote its
    output, how to launch it again (a single run), the code's commit."""
    tags = {runs.JOB_KEY_TAG: runs.job_key(job.overrides)}
    if job.control:
        tags[runs.CONTROL_TAG] = job.control
    if job.output_dir:
        tags["hydra_output_dir"] = job.output_dir
    if job.launch:
        tags[runs.LAUNCH_TAG] = job.launch
    if commit := git_commit():
        tags["git_commit"] = commit
    return tags


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as {"optimizer.lr": "0.001", ...}; lists stay whole ("[32, 64]")."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {key: str(value) for key, value in config.leaves(resolved, split_lists=False)}


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, if it runs from one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def log_config(cfg: DictConfig, overrides: list[str]) -> None:
    """The resolved config as dotted params and as config.yaml; the command-line overrides as overrides.yaml."""
    mlflow.log_params(flat_params(cfg))
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    mlflow.log_text("".join(f"- {o}\n" for o in overrides) or "[]\n", "overrides.yaml")


def log_data(split: data.Split, folder: Path, data_cfg: DictConfig, seed: int) -> None:
    """Where the images came from (tags), which images each part holds (dataset inputs) and how many (params)."""
    log_data_source(folder, data.SHA256)
    log_datasets(split, folder, data.SHA256, data_cfg, seed)
    mlflow.log_params({"n_train": len(split.y_train), "n_val": len(split.y_val), "n_test": len(split.y_test)})


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


def serving_model(model: keras.Model) -> keras.Model:
    """model behind what a user has: raw uint8 images of 28x28 pixels, 0-255, in; class probabilities out. The
    scaling is data.split's (x / 255 in float32, to the bit), so the served model scores what the run scored."""
    images = keras.Input(data.IMAGE_SHAPE[:2], dtype="uint8", name="images")
    pixels = keras.layers.Reshape(data.IMAGE_SHAPE)(images)
    scaled = keras.layers.Normalization(mean=0.0, variance=255.0**2, dtype="float32", name="divide_by_255")(pixels)
    return keras.Model(images, model(scaled), name=f"{model.name}_on_raw_pixels")


def log_model(model: keras.Model, images: np.ndarray, probabilities: np.ndarray) -> str:
    """Log serving_model(model) as an MLflow Keras model, linked to the run: signature uint8 images (n, 28, 28) ->
    probabilities (n, 10), with images as its input example. Returns the model's URI."""
    served = serving_model(model)
    signature = infer_signature(images, probabilities)
    # Explicit requirements: letting mlflow 3.17 infer them costs ~5 s per run; these are what loading needs.
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
    with mlflow_internals.requirements_checked_by_name(), mlflow_internals.keras_model_folder_made_first():
        info = mlflow.keras.log_model(served, name="model", signature=signature, input_example=images[:2],
                                      pip_requirements=requirements)  # fmt: skip
    return info.model_uri
