"""The test set: scoring a trained model on it and recording the scores on a run (test_loss, test_accuracy,
test_seconds, confusion_matrix.png, misclassified.png), in the job or, for a sweep's selected runs, afterwards.

Owns every use of the test split and the rule of who meets it (tracking.test_set); training is train.py's, which
runs a sweep selected compare.py's, when the sweep scores them sweep.py's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import keras
import mlflow
import numpy as np
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fashion_sweep import backend, checkpoint, data, plots, runs, schedule_free
from fashion_sweep.models import build_model
from fashion_sweep.optimizers import build_optimizer

log = logging.getLogger(__name__)


@dataclass
class Scores:
    loss: float
    accuracy: float
    seconds: float  # predicting the test split
    predicted: np.ndarray  # the class predicted for each test image
    probabilities: np.ndarray  # (n, 10)


def scored_in_job(test_set: str, in_sweep: bool) -> bool:
    """Whether a training job scores the test set itself: a single run (or a sweep's control, which is not chosen
    among others) unless test_set is none; a sweep's job only with all (with selected, the sweep scores the runs it
    chose, after choosing on validation)."""
    return test_set == "all" or (test_set == "selected" and not in_sweep)


def why_not(test_set: str, in_sweep: bool) -> str:
    """Why a finished job has no test score, for its description."""
    if test_set == "selected" and in_sweep:
        return "the test set is scored once, for the setting the sweep selects"
    return "the test set is not scored (tracking.test_set=none)"


def predict(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities, batch_size images at a time. Not model.predict: on the 10k test images it took
    0.55 s longer than this loop (1.32 s against 0.76 s, seed_cnn, float32, AMD EPYC; Keras 3.15)."""
    batches = [model.predict_on_batch(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(batches)


def score(model: keras.Model, split: data.Split, batch_size: int) -> Scores:
    """The model's loss and accuracy on the test split."""
    started = time.perf_counter()
    probabilities = predict(model, split.x_test, batch_size)
    predicted = probabilities.argmax(axis=1)
    loss = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(split.y_test, probabilities)))
    accuracy = float((predicted == split.y_test).mean())
    return Scores(loss, accuracy, time.perf_counter() - started, predicted, probabilities)


def log_scores(client: MlflowClient, run_id: str, scores: Scores, split: data.Split) -> None:
    """The two figures drawn from the predictions, then the test metrics, on run_id (active or not): a run with
    test_accuracy is scored whole (a sweep stopped in between scores it again on resume)."""
    confusion = plots.confusion_matrix(split.y_test, scores.predicted, data.CLASS_NAMES)
    client.log_figure(run_id, confusion, "confusion_matrix.png")
    wrong = plots.misclassified(split.x_test, split.y_test, scores.predicted, data.CLASS_NAMES)
    client.log_figure(run_id, wrong, "misclassified.png")
    now = int(time.time() * 1000)
    values = {"test_loss": scores.loss, "test_accuracy": scores.accuracy, "test_seconds": scores.seconds}
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in values.items()])


def score_run(client: MlflowClient, run: Run) -> Scores:
    """Score a finished run afterwards, as its job would have: its network rebuilt from its config.yaml in the
    precision it trained in, with the weights of its last checkpoint (the end of its last epoch)."""
    cfg = OmegaConf.create(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml"))
    state = checkpoint.load_from_run(run)
    if state is None:
        raise checkpoint.CheckpointError(f"run {run.info.run_id} has no checkpoint to score the test set with")
    split, _ = data.split_for(cfg)
    keras.backend.clear_session(free_memory=False)
    backend.set_precision(run.data.tags.get("precision", "float32"))
    model = build_model(cfg.model)
    if cfg.optimizer.name == "schedule_free_adamw":  # its average x needs the optimizer's state: all of it restored
        model.compile(optimizer=build_optimizer(cfg.optimizer))
        checkpoint.restore(model, state)
        schedule_free.to_average(model, split.x_train, cfg.trainer.batch_size)
    else:
        checkpoint.restore_weights(model, state)
    scores = score(model, split, cfg.trainer.eval_batch_size)
    log_scores(client, run.info.run_id, scores, split)
    note = run.data.tags.get(runs.NOTE_TAG, "")
    selected = f"selected by its sweep on validation loss, then scored: test accuracy {scores.accuracy:.4f}"
    client.set_tag(run.info.run_id, runs.NOTE_TAG, note.replace(why_not("selected", True), selected))
    return scores
