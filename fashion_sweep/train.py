"""One training run: data, model and optimizer from the config, model.fit, a test evaluation, all recorded.

Owns the order of a run and what it records when; the run's life in MLflow is tracking.py's, how figures
look is plots.py's.
"""

from __future__ import annotations

import logging
import math
import os
import time

import keras
import mlflow
import numpy as np
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from fashion_sweep import backend, checkpoint, data, halving, plots, progress, tracking
from fashion_sweep.models import build_model, with_keras_layers
from fashion_sweep.optimizers import build_optimizer

log = logging.getLogger(__name__)


class Diverged(Exception):
    """The training loss became NaN or exploded: a result of the learning rate, not a crash."""


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training when the training loss is NaN (checked every batch) or, at an epoch's end, above limit."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit = limit
        self.reason: str | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.reason = f"training loss became {float(loss)} at batch {batch + 1}"
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", math.nan))
        if self.reason is None and loss > self.limit:
            self.reason = f"training loss {loss:.3g} exceeded trainer.diverge_loss={self.limit:g} in epoch {epoch + 1}"
            self.model.stop_training = True


class ProgressLog(keras.callbacks.Callback):
    """After every epoch, logs where the sweep is (job i/n, epoch, time left) and mirrors it on the parent run."""

    def __init__(self, plan: progress.Plan, job_num: int, client: MlflowClient, parent_run_id: str | None) -> None:
        super().__init__()
        self.plan, self.job_num, self.client, self.parent_run_id = plan, job_num, client, parent_run_id

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        line = progress.describe(self.plan, self.job_num, epoch + 1, time.time())
        log.info(line)
        if self.parent_run_id:
            try:
                self.client.set_tag(self.parent_run_id, progress.PROGRESS_TAG, line)
            except MlflowException as err:  # the parent's progress is a courtesy: never fail the job for it
                log.warning("progress not mirrored on the sweep's parent run: %s", str(err).splitlines()[0])


def progress_log(client: MlflowClient, first_epoch: int, stop: int) -> ProgressLog:
    """The sweep's plan, as its launcher wrote it on the parent run, and this job's number in it; a run outside
    a sweep plans its own epochs."""
    parent_run_id = os.environ.get(tracking.PARENT_RUN_ENV)
    plan_json = client.get_run(parent_run_id).data.tags.get(progress.PLAN_TAG) if parent_run_id else None
    if plan_json is None:
        return ProgressLog(progress.single_run_plan(first_epoch, stop), 0, client, parent_run_id)
    return ProgressLog(progress.Plan.from_json(plan_json), int(HydraConfig.get().job.num), client, parent_run_id)


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name} {cfg.optimizer.name} lr={cfg.optimizer.lr:g}"


def load_split(cfg: DictConfig) -> tuple[data.Split, data.FashionMNIST]:
    """Find, check and decode the data (once per process), then split it as cfg.data says (once per setting)."""
    folder = data.locate_once(cfg.data.dir, cfg.data.system_dir, cfg.data.cache_dir, cfg.data.url)
    return data.load_split(folder, cfg.data.val_fraction, cfg.data.train_size, cfg.trainer.seed)


def shift_and_flip(images: tf.Tensor, seed: tf.Tensor, max_shift: int) -> tf.Tensor:
    """Each image flipped left-right with probability 1/2 and shifted by up to max_shift pixels each way (the freed
    border black), drawn from seed alone (stateless), so a resumed run sees the same images."""
    flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    images = tf.image.stateless_random_flip_left_right(images, flip_seed)
    count = tf.shape(images)[0]
    shifts = tf.random.stateless_uniform([count, 2], shift_seed, -max_shift, max_shift + 1, dtype=tf.int32)
    dx, dy = tf.unstack(tf.cast(shifts, tf.float32), axis=1)
    one, zero = tf.ones_like(dx), tf.zeros_like(dx)
    transforms = tf.stack([one, zero, dx, zero, one, dy, zero, zero], axis=1)  # output(x, y) = input(x + dx, y + dy)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="NEAREST", fill_mode="CONSTANT",
    )  # fmt: skip


def training_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, first_epoch: int, epochs: int,
                     max_shift: int | None = None, label_smoothing: float = 0.0):  # fmt: skip
    """Shuffled batches for epochs first_epoch+1..epochs, each epoch's order (and, with max_shift, each batch's
    flips and shifts) drawn from (seed, epoch) alone: a run continued at any epoch sees the same data as one that
    was never interrupted. With label_smoothing the labels are one-hot (the loss smooths them)."""
    images, labels = tf.constant(x), tf.constant(y)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(tf.range(len(x)), seed=tf.stack([seed, epoch]))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return batches.map(lambda number, index: (tf.stack([seed, epoch]), number, index))

    def load(epoch_seed: tf.Tensor, number: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch, batch_labels = tf.gather(images, index), tf.gather(labels, index)
        if max_shift is not None:
            batch_seed = tf.random.experimental.stateless_fold_in(epoch_seed, number)
            batch = shift_and_flip(batch, batch_seed, max_shift)
        if label_smoothing:
            batch_labels = tf.one_hot(tf.cast(batch_labels, tf.int32), data.NUM_CLASSES)
        return batch, batch_labels

    # No autotuning: deleting an autotuned iterator waits for the tuner thread's current sleep, which grows to
    # 60 s, so model.fit returned 9-70 s after its last epoch in most full runs (TensorFlow 2.21, gdb stacks).
    options = tf.data.Options()
    options.autotune.enabled = False
    return (
        tf.data.Dataset.range(first_epoch, epochs)
        .flat_map(one_epoch)
        .map(load, num_parallel_calls=os.cpu_count() or 1)
        .prefetch(2)
        .with_options(options)
    )


def training_loss(label_smoothing: float) -> keras.losses.Loss | str:
    """Cross-entropy on integer labels, or with label_smoothing on one-hot labels (Keras 3.15's sparse loss has no
    smoothing): each target 1 - label_smoothing + label_smoothing / 10, the other classes label_smoothing / 10."""
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def existing_run(client: MlflowClient, experiment_id: str) -> Run | None:
    """The run this job continues or skips: its sweep's child with the same overrides, or the run that
    fashion-sweep-resume names; None for a new run."""
    if parent_run_id := os.environ.get(tracking.PARENT_RUN_ENV):
        return tracking.job_run(client, experiment_id, parent_run_id, tracking.job_key(task_overrides()))
    if run_id := os.environ.get(tracking.RESUME_RUN_ENV):
        return client.get_run(run_id)
    return None


def run_tags(cfg: DictConfig) -> dict[str, str]:
    tags = {"job_overrides": tracking.job_key(task_overrides())}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        tags["hydra_output_dir"] = hydra_cfg.runtime.output_dir
        if tracking.PARENT_RUN_ENV not in os.environ:  # a single run: how to launch it again
            tags["launch"] = tracking.launch_record(hydra_cfg.runtime.cwd, task_overrides(), hydra_cfg.overrides.hydra)
    if commit := tracking.git_commit():
        tags["git_commit"] = commit
    return tags


def predict(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities, batch_size images at a time. Not model.predict: on the 10k test images it took
    0.55 s longer than this loop (1.32 s against 0.76 s, seed_cnn, float32, AMD EPYC; Keras 3.15)."""
    batches = [model.predict_on_batch(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(batches)


def stop_epoch(cfg: DictConfig) -> int:
    """The epoch this job trains up to: trainer.epochs, or a halving sweep's rung (set in the job's environment)."""
    return min(int(os.environ.get(halving.STOP_EPOCH_ENV, cfg.trainer.epochs)), cfg.trainer.epochs)


def train(cfg: DictConfig) -> float:
    """Train and evaluate as cfg says inside one MLflow run; return the lowest val_loss (inf if diverged).

    A job whose run is already done (or, in a halving sweep, already past this rung) returns its result without
    training; one whose run was interrupted, or paused at an earlier rung, continues it from its checkpoint.
    """
    experiment_id = tracking.connect(cfg.tracking)
    client = MlflowClient(str(cfg.tracking.uri))
    previous = existing_run(client, experiment_id)
    stop = stop_epoch(cfg)
    if previous is not None and (tracking.is_done(previous) or past_rung(client, previous, stop, cfg)):
        log.info("%s: done up to epoch %d in run %s; not run again", run_name(cfg), stop, previous.info.run_id)
        return tracking.best_val_loss(client, previous, through=stop)
    try:
        continued = previous.info.run_id if previous else None
        with tracking.run(experiment_id, run_name(cfg), run_tags(cfg), continued):
            return fit_and_record(cfg, client, previous, stop)
    except Diverged as err:
        log.warning("%s diverged: %s", run_name(cfg), err)
        return math.inf
    except tracking.Paused as paused:
        log.info("%s: %s (a rung of a halving sweep), best val_loss %.4f", run_name(cfg), paused, paused.best_val_loss)
        return paused.best_val_loss


def past_rung(client: MlflowClient, run: Run, stop: int, cfg: DictConfig) -> bool:
    """A halving sweep asks for an earlier rung than the run has already trained to (its sweep is resumed)."""
    return stop < cfg.trainer.epochs and len(tracking.logged_epochs(client, run.info.run_id)) >= stop


def resume_point(client: MlflowClient, previous: Run) -> checkpoint.Checkpoint | None:
    """The checkpoint to continue from; logs the epochs it holds that the store lacks (a death between the two)."""
    state = tracking.load_checkpoint(previous)
    logged = tracking.logged_epochs(client, previous.info.run_id)
    covered = state.epoch if state else 0
    if any(step > covered for step in logged):
        raise checkpoint.CheckpointError(
            f"run {previous.info.run_id} logged epochs up to {max(logged)} but its checkpoint holds {covered}; "
            "it was written by a fashion-sweep without checkpoints and cannot be continued"
        )
    for epoch in range(1, covered + 1):
        if epoch not in logged and state is not None:
            mlflow.log_metrics({name: values[epoch - 1] for name, values in state.history.items()}, step=epoch)
    if state:
        log.info("Continuing run %s from its checkpoint after epoch %d", previous.info.run_id, state.epoch)
    return state


def run_precision(setting: str, previous: Run | None) -> tuple[str, str]:
    """(precision, why) to train in. Under auto a continued run keeps the precision it began in (auto's rule, or
    the CPU, may have changed since); runs from before trainer.precision existed began in float32."""
    if previous is None or setting != "auto":
        return backend.choose_precision(setting, backend.cpu_flags(), backend.cpu_vendor())
    tags = previous.data.tags
    if "precision" not in tags:
        return "float32", "auto: kept from the run's start (written before trainer.precision, in float32)"
    return tags["precision"], tags.get("precision_reason", "auto: kept from the run's start")


def fit_and_record(cfg: DictConfig, client: MlflowClient, previous: Run | None, stop: int) -> float:
    """Inside the active run: log the config, load data, fit up to epoch `stop` (from the checkpoint, if
    continuing), then, if that is the last epoch, evaluate on the test set and log figures and model."""
    if previous is None:
        tracking.log_config(cfg, task_overrides())
    split, dataset = load_split(cfg)
    if previous is None:
        tracking.log_data_source(dataset.source, data.SHA256)
        tracking.log_datasets(split, dataset.source, data.SHA256, cfg.data, cfg.trainer.seed)
        mlflow.log_params({"n_train": len(split.y_train), "n_val": len(split.y_val), "n_test": len(split.y_test)})
    # Jobs of a sweep share this process: start each from a clean Keras state. Without the full gc.collect()
    # Keras 3.15 runs by default (~0.3-0.45 s per job here); Python's own collector frees the old model.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(cfg.trainer.seed)
    precision, why = run_precision(cfg.trainer.precision, previous)
    backend.set_precision(precision)
    mlflow.set_tags({"precision": precision, "precision_reason": why})
    n, batch_size, smoothing = len(split.y_train), cfg.trainer.batch_size, cfg.trainer.label_smoothing
    steps_per_epoch = math.ceil(n / batch_size)
    model = build_model(cfg.model)
    optimizer = build_optimizer(cfg.optimizer, total_steps=cfg.trainer.epochs * steps_per_epoch)
    model.compile(optimizer=optimizer, loss=training_loss(smoothing), metrics=["accuracy"])
    state = resume_point(client, previous) if previous is not None else None
    if state is not None:
        checkpoint.restore(model, state)
    first_epoch = state.epoch if state else 0

    guard = DivergenceGuard(cfg.trainer.diverge_loss)
    recorder = tracking.EpochRecorder(state.history if state else {}, state.fit_seconds if state else 0.0)
    max_shift = cfg.data.max_shift if cfg.data.augment == "flip_shift" else None
    y_val = keras.utils.to_categorical(split.y_val, data.NUM_CLASSES) if smoothing else split.y_val
    model.fit(
        training_batches(
            split.x_train, split.y_train, batch_size, cfg.trainer.seed, first_epoch, stop, max_shift, smoothing
        ),  # fmt: skip
        steps_per_epoch=steps_per_epoch,
        epochs=stop,
        initial_epoch=first_epoch,
        validation_data=(split.x_val, y_val),  # never augmented
        validation_batch_size=cfg.trainer.eval_batch_size,
        callbacks=[guard, recorder, progress_log(client, first_epoch, stop)],
        shuffle=False,  # training_batches shuffles, per epoch, reproducibly
        verbose=cfg.trainer.verbose,
    )
    history = recorder.history
    # step = the epochs trained so far: a run continued rung by rung (or resumed) logs it once per fit, in order
    mlflow.log_metric("fit_seconds", recorder.fit_seconds, step=len(history.get("loss", [])))
    if guard.reason is not None:
        mlflow.set_tag("diverged", "true")
        raise Diverged(f"{guard.reason}; training stopped")
    if stop < cfg.trainer.epochs:
        raise tracking.Paused(stop, min(history["val_loss"], default=math.inf))

    started = time.perf_counter()
    probabilities = predict(model, split.x_test, cfg.trainer.eval_batch_size)
    predicted = probabilities.argmax(axis=1)
    test_loss = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(split.y_test, probabilities)))
    test_accuracy = float((predicted == split.y_test).mean())
    test_seconds = time.perf_counter() - started
    mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy, "test_seconds": test_seconds})
    log.info("%s: test accuracy %.4f, test loss %.4f", run_name(cfg), test_accuracy, test_loss)

    mlflow.log_figure(plots.curves(history), "curves.png")
    mlflow.log_figure(plots.confusion_matrix(split.y_test, predicted, data.CLASS_NAMES), "confusion_matrix.png")
    mlflow.log_figure(plots.misclassified(split.x_test, split.y_test, predicted, data.CLASS_NAMES), "misclassified.png")
    if cfg.tracking.log_model:
        tracking.log_model(with_keras_layers(model), split.x_test[:8], probabilities[:8])
    return min(history["val_loss"])
