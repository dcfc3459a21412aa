"""One training run: data -> model -> compile -> fit -> (test score), recorded in MLflow.

Owns the order of a run; the batches are pipeline.py's, the per-epoch work callbacks.py's, where a job goes on
from continuation.py's, what is recorded tracking.py's, the test set scoring.py's, a run's life in the store runs.py's.
"""

from __future__ import annotations

import logging
import math

import keras
import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from fashion_sweep import (
    backend,
    callbacks,
    checkpoint,
    continuation,
    data,
    halving,
    pipeline,
    plots,
    registry,
    runs,
    schedule_free,
    scoring,
    tracking,
)
from fashion_sweep.models import build_model, with_keras_layers
from fashion_sweep.optimizers import build_optimizer

log = logging.getLogger(__name__)

METRICS = ["accuracy"]  # compiled into the model: each is logged per epoch (with its val_ twin) and in the report


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name} {cfg.optimizer.name} lr={cfg.optimizer.lr:g}"


def train(cfg: DictConfig) -> float:
    """Train and evaluate as cfg says inside one MLflow run; return the lowest val_loss (inf if diverged).

    A job whose run is already done (or, in a halving sweep, already past this rung) returns its result without
    training; one whose run was interrupted, or paused at an earlier rung, continues it from its checkpoint.
    """
    experiment_id = runs.connect(cfg.tracking)
    client = MlflowClient(str(cfg.tracking.uri))
    job = continuation.job_context(cfg.trainer.epochs)
    previous = continuation.existing_run(client, experiment_id, job)
    if continuation.pin_precision(cfg, previous):  # continued on a CPU where auto picks another precision
        job = continuation.job_context(cfg.trainer.epochs)
    if previous is not None and continuation.answered_by(client, previous, job, cfg.trainer.epochs):
        done = (run_name(cfg), job.stop_epoch, previous.info.run_id)
        log.info("%s: done up to epoch %d in run %s; not run again", *done)
        return runs.best_val_loss(client, previous, through=job.stop_epoch)
    start = continuation.resume_point(client, previous) if previous else continuation.ResumePoint(None, frozenset())
    try:
        continued = previous.info.run_id if previous else None
        sampling = cfg.tracking.system_metrics_interval if cfg.tracking.get("system_metrics") else None
        tags = tracking.run_tags(job)
        with runs.run(experiment_id, run_name(cfg), tags, job.parent_run_id, continued, sampling) as run_id:
            best = fit_and_record(cfg, client, job, previous, start)
        log.info("%s: run %s finished (lowest validation loss %.4f)", run_name(cfg), run_id, best)
        return best
    except callbacks.Diverged as err:
        log.warning("%s diverged: %s", run_name(cfg), err)
        return math.inf
    except runs.Paused as paused:
        log.info("%s: %s (a rung of a halving sweep), best val_loss %.4f", run_name(cfg), paused, paused.best_val_loss)
        return paused.best_val_loss


def fit_and_record(
    cfg: DictConfig, client: MlflowClient, job: continuation.Job, previous: Run | None, start: continuation.ResumePoint
) -> float:
    """Inside the active run: record the config and data, fit up to job.stop_epoch (from start's checkpoint, if
    continuing), then, if that is the last epoch, log figures and model and score the test set where this job does."""
    split, dataset = data.split_for(cfg)
    if previous is None:
        tracking.log_config(cfg, job.overrides)
        tracking.log_data(split, dataset.source, cfg.data, cfg.trainer.seed)

    # Jobs of a sweep share this process: start each from a clean Keras state. Without the full gc.collect()
    # Keras 3.15 runs by default (~0.3-0.45 s per job here); Python's own collector frees the old model.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(cfg.trainer.seed)
    precision, why = continuation.run_precision(cfg.trainer.precision, previous)
    backend.set_precision(precision)
    recipe = {"recipe": cfg.recipe} if cfg.get("recipe") else {}  # a preset's variant, e.g. best_cnn's per precision
    mlflow.set_tags({"precision": precision, "precision_reason": why, **recipe})

    batch_size, smoothing, stop = cfg.trainer.batch_size, cfg.trainer.label_smoothing, job.stop_epoch
    steps_per_epoch = math.ceil(len(split.y_train) / batch_size)
    state = start.state
    key = runs.job_key(job.overrides)
    model = halving.kept_model(key, state.epoch) if state else None  # paused at the last rung in this process
    if model is None:
        model = build_model(cfg.model)
        optimizer = build_optimizer(cfg.optimizer, total_steps=cfg.trainer.epochs * steps_per_epoch)
        model.compile(optimizer=optimizer, loss=pipeline.training_loss(smoothing), metrics=METRICS)
        if state is not None:
            checkpoint.restore(model, state)
    elif state:
        log.info("%s: goes on with its model kept in memory since epoch %d", run_name(cfg), state.epoch)
    first_epoch = state.epoch if state else 0

    guard = callbacks.DivergenceGuard(cfg.trainer.diverge_loss)
    recorder = callbacks.EpochRecorder(
        state.history if state else {}, state.fit_seconds if state else 0.0, start.logged
    )
    max_shift = cfg.data.max_shift if cfg.data.augment == "flip_shift" else None
    per_epoch = [guard, recorder, callbacks.progress_log(client, job.parent_run_id, job.number, first_epoch, stop)]
    if schedule_free.applies(model):  # validated at its average x, trained on from y
        per_epoch.insert(0, schedule_free.ValidateAtAverage(split.x_train, batch_size))
    model.fit(
        pipeline.training_batches(
            split.x_train, split.y_train, batch_size, cfg.trainer.seed, first_epoch, stop, max_shift, smoothing
        ),  # fmt: skip
        steps_per_epoch=steps_per_epoch,
        epochs=stop,
        initial_epoch=first_epoch,
        validation_data=(split.x_val, pipeline.validation_labels(split.y_val, smoothing)),  # never augmented
        validation_batch_size=cfg.trainer.eval_batch_size,
        callbacks=per_epoch,
        shuffle=False,  # training_batches shuffles, per epoch, reproducibly
        verbose=cfg.trainer.verbose,
    )
    history = recorder.history
    # step = the epochs trained so far: a run continued rung by rung (or resumed) logs it once per fit, in order
    mlflow.log_metric("fit_seconds", recorder.fit_seconds, step=len(history.get("loss", [])))
    if guard.reason is not None:
        mlflow.set_tag(runs.DIVERGED_TAG, "true")
        raise callbacks.Diverged(guard.epoch, guard.reason)
    best, at = best_epoch(history["val_loss"])
    if stop < cfg.trainer.epochs:
        mlflow.set_tag(runs.NOTE_TAG, f"Paused after epoch {stop} (a rung of a halving sweep); best val_loss so far "
                                      f"{best:.4f}, at epoch {at}.")  # fmt: skip
        halving.keep_model(key, stop, model)
        raise runs.Paused(stop, best)

    if schedule_free.applies(model):  # the test score and the logged model are the average's, as validation was
        schedule_free.to_average(model, split.x_train, batch_size)
    in_sweep = job.parent_run_id is not None
    chosen_later = in_sweep and job.control is None  # a sweep's control is no candidate to choose: scored here
    test_accuracy = record_result(cfg, model, split, history, dataset.x_test[..., 0], chosen_later)
    name = cfg.tracking.get("registered_model")
    registers = cfg.tracking.get("register_single_runs") and name and not in_sweep
    if registers and cfg.tracking.log_model:
        active = mlflow.active_run()
        assert active is not None
        run = client.get_run(active.info.run_id)  # a sweep registers its best model when it ends
        score = {"best_val_loss": f"{best:.6g}"}
        if test_accuracy is not None:
            score["test_accuracy"] = f"{test_accuracy:.4f}"
        registry.register(client, name, run, score)
    test_set = cfg.tracking.get("test_set", "selected")
    scored = f"test accuracy {test_accuracy:.4f}" if test_accuracy is not None else None
    tested = scored or scoring.why_not(test_set, chosen_later)
    mlflow.set_tag(runs.NOTE_TAG, f"Finished: best val_loss {best:.4f} at epoch {at} of {stop}; {tested}.")
    return best


def best_epoch(val_losses: list[float]) -> tuple[float, int]:
    """The lowest validation loss and its epoch (from 1); (inf, 0) if there is none."""
    finite = [(loss, epoch) for epoch, loss in enumerate(val_losses, start=1) if math.isfinite(loss)]
    return min(finite, default=(math.inf, 0))


def record_result(
    cfg: DictConfig,
    model: keras.Model,
    split: data.Split,
    history: dict[str, list[float]],
    raw_test_images: np.ndarray,
    chosen_later: bool,
) -> float | None:
    """Log the curves; score the test split if this job does (scoring.scored_in_job: not if its sweep chooses among
    its jobs later), with its confusion matrix and misclassified images; log the model (which takes the raw uint8
    images). Returns the test accuracy, if scored."""
    mlflow.log_figure(plots.curves(history), "curves.png")
    scores = None
    if scoring.scored_in_job(cfg.tracking.get("test_set", "selected"), chosen_later):
        scores = scoring.score(model, split, cfg.trainer.eval_batch_size)
        active = mlflow.active_run()
        assert active is not None
        scoring.log_scores(MlflowClient(str(cfg.tracking.uri)), active.info.run_id, scores, split)
        log.info("%s: test accuracy %.4f, test loss %.4f", run_name(cfg), scores.accuracy, scores.loss)
    if cfg.tracking.log_model:
        example = raw_test_images[:8]  # the model's input example: 8 raw test images and what it makes of them
        probabilities = scoring.predict(model, split.x_test[:8], 8) if scores is None else scores.probabilities[:8]
        tracking.log_model(with_keras_layers(model), example, probabilities)
    return scores.accuracy if scores else None
