"""A training run's checkpoint: everything that makes a continued run equal to an uninterrupted one.

Owns the file format (one .npz: the model's variables with Dropout's random-seed state, the optimizer's
variables with its iteration count, the epoch reached, the history so far), where it is kept (two artifact slots of
the run, tags `checkpoint`, `checkpoint_epoch`, `checkpoint_sha256`) and putting it back into a model. When it is
written is callbacks.py's; when it is read, continuation.py's; the data order per epoch is pipeline.py's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """The checkpoint is damaged or belongs to another network."""


@dataclass
class Checkpoint:
    epoch: int  # epochs completed; training continues at epoch + 1
    history: dict[str, list[float]]  # per-epoch metrics of epochs 1..epoch
    fit_seconds: float  # seconds inside model.fit so far
    variables: dict[str, np.ndarray]  # "model/<path>" and "optimizer/<path>" -> value


def model_variables(model: keras.Model) -> dict[str, keras.Variable]:
    """The model's own variables (weights, non-trainable state), by their name in a checkpoint."""
    return {f"model/{v.path}": v for v in model.variables}


def variables_of(model: keras.Model) -> dict[str, keras.Variable]:
    """Every variable training changes: weights, non-trainable state (incl. Dropout's seed), optimizer slots."""
    found = model_variables(model)
    found.update({f"optimizer/{v.path}": v for v in model.optimizer.variables})
    return found


def capture(model: keras.Model, epoch: int, history: dict[str, list[float]], fit_seconds: float) -> Checkpoint:
    values = {name: keras.ops.convert_to_numpy(v) for name, v in variables_of(model).items()}
    return Checkpoint(epoch, {k: list(v) for k, v in history.items()}, fit_seconds, values)


def save(state: Checkpoint, path: Path) -> str:
    """Write state to path; return the file's SHA-256."""
    meta = json.dumps({"epoch": state.epoch, "history": state.history, "fit_seconds": state.fit_seconds})
    buffer = io.BytesIO()
    arrays: dict[str, np.ndarray] = {"__meta__": np.array(meta), **state.variables}
    np.savez(buffer, allow_pickle=False, **arrays)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def load(path: Path, sha256: str | None) -> Checkpoint:
    """The checkpoint in path, checked against sha256 if given; every array is checked by its zip CRC either way."""
    raw = path.read_bytes()
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise CheckpointError(f"checkpoint {path.name} is damaged (SHA-256 differs from the one recorded)")
    try:
        with np.load(io.BytesIO(raw)) as arrays:
            meta = json.loads(str(arrays["__meta__"]))
            variables = {name: arrays[name] for name in arrays.files if name != "__meta__"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # cut short or overwritten
        raise CheckpointError(f"checkpoint {path.name} is damaged ({err})") from None
    return Checkpoint(meta["epoch"], meta["history"], meta["fit_seconds"], variables)


def restore(model: keras.Model, state: Checkpoint) -> None:
    """Assign the checkpoint's values to a freshly built and compiled model of the same config."""
    model.optimizer.build(model.trainable_variables)
    assign(variables_of(model), state.variables)


def restore_weights(model: keras.Model, state: Checkpoint) -> None:
    """Assign the checkpoint's model variables (not the optimizer's) to a freshly built model of the same config:
    enough to predict with, as the run's own model did after that epoch."""
    saved = {name: value for name, value in state.variables.items() if name.startswith("model/")}
    assign(model_variables(model), saved)


def assign(targets: dict[str, keras.Variable], values: dict[str, np.ndarray]) -> None:
    if set(targets) != set(values):
        raise CheckpointError("the checkpoint holds other variables than this model: was the config changed?")
    for name, variable in targets.items():
        variable.assign(values[name])


def slot(epoch: int) -> str:
    """The artifact path of the checkpoint after epoch: two slots, written in turn."""
    return f"checkpoint/slot-{epoch % 2}.npz"


def log_to_run(state: Checkpoint) -> None:
    """Write state into its slot of the active run, then point the tag `checkpoint` at it: a process killed while
    writing leaves the tag on the previous, whole checkpoint."""
    path = slot(state.epoch)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / Path(path).name
        digest = save(state, local)
        mlflow.log_artifact(str(local), "checkpoint")
    mlflow.set_tags({"checkpoint": path, "checkpoint_epoch": str(state.epoch), "checkpoint_sha256": digest})


def load_from_run(run: Run) -> Checkpoint | None:
    """The newest whole checkpoint of run, or None if it has none: the one its tags name, checked against their
    SHA-256, or, if that one is damaged or missing, the previous epoch's in the other slot (checked by its zip
    CRCs and its epoch), saying so. With neither, CheckpointError says how to start the job afresh."""
    tags, run_id = run.data.tags, run.info.run_id
    if "checkpoint" not in tags:
        return None
    try:
        return load_artifact(run, tags["checkpoint"], tags["checkpoint_sha256"])
    except CheckpointError as err:
        problem = str(err)
    previous = int(tags["checkpoint_epoch"]) - 1
    try:
        state = load_artifact(run, slot(previous), None) if previous >= 1 else None
    except CheckpointError:
        state = None
    if state is not None and state.epoch == previous:
        log.warning("Run %s: %s; continuing from the previous one, after epoch %d", run_id, problem, previous)
        return state
    raise CheckpointError(
        f"run {run_id} has no whole checkpoint left ({problem}); to start that job afresh, delete the run "
        f"(MLFLOW_TRACKING_URI=<store> mlflow runs delete --run-id {run_id}) and run or resume it again"
    )


def load_artifact(run: Run, path: str, sha256: str | None) -> Checkpoint:
    """The checkpoint at the run's artifact path, or CheckpointError if it is missing or damaged."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/{path}", dst_path=folder)
        except (MlflowException, OSError):
            raise CheckpointError(f"checkpoint {path} is missing") from None
        return load(Path(local), sha256)
