"""The LR range test (`experiment=lr_find`): one short run, the learning rate raised exponentially per batch.

Owns the schedule, smoothing, stop rule, suggestion and sweep command (pure functions) and the one run recording
them; it leaves no model behind (no checkpoint, logged model or test metrics): its result is a learning rate.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from fashion_sweep import backend, continuation, data, pipeline, plots, runs, tracking
from fashion_sweep.models import build_model
from fashion_sweep.optimizers import build_optimizer

log = logging.getLogger(__name__)

RULE = "suggested lr = the lr at the lowest smoothed loss / 10 (fastai; Smith 2015)"
TRACE_METRICS = ("lr_find_lr", "lr_find_loss", "lr_find_smoothed_loss")  # step = batch index, from 0


@dataclass
class Trace:
    """What a range test recorded, one entry per batch (index = batch = MLflow step), and why it stopped."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # each batch's training loss, before its update
    smoothed: list[float] = field(default_factory=list)
    stopped: str = ""


def schedule(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """steps learning rates from start_lr to end_lr, both included, each the one before times a constant factor."""
    return [float(lr) for lr in np.geomspace(start_lr, end_lr, steps)]


def smoothed(losses: Sequence[float], beta: float) -> list[float]:
    """fastai's bias-corrected exponential moving average: avg_n = beta avg_(n-1) + (1 - beta) loss_n from avg_0 = 0,
    divided by 1 - beta**n, so that the first value is the first loss, not (1 - beta) times it."""
    avg, out = 0.0, []
    for n, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**n))
    return out


def blew_up(smooth: float, best: float, stop_factor: float) -> bool:
    """The stop rule: the smoothed loss is not finite, or above stop_factor times its lowest value so far."""
    return not math.isfinite(smooth) or smooth > stop_factor * best


def range_test(train_step: Callable[[float], float], lrs: Sequence[float], beta: float, stop_factor: float) -> Trace:
    """train_step(lr) -> that batch's loss, for each lr in turn, until the smoothed loss blows up (recorded) or
    the loss is not finite (not recorded)."""
    trace = Trace(stopped=f"reached the last learning rate after {len(lrs)} batches")
    avg, best = 0.0, math.inf
    for batch, lr in enumerate(lrs):
        loss = train_step(lr)
        if not math.isfinite(loss):
            trace.stopped = f"the training loss became {loss} at batch {batch} (lr {lr:.2g})"
            break
        avg = beta * avg + (1 - beta) * loss  # smoothed(), one loss at a time
        smooth = avg / (1 - beta ** (batch + 1))
        best = min(best, smooth)
        trace.lrs.append(lr)
        trace.losses.append(loss)
        trace.smoothed.append(smooth)
        if blew_up(smooth, best, stop_factor):
            trace.stopped = (
                f"the smoothed loss {smooth:.3g} exceeded {stop_factor:g} x its lowest ({best:.3g}) "
                f"at batch {batch} (lr {lr:.2g})"
            )
            break
    return trace


def suggestion(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[float, float]:
    """(min_loss_lr, suggested_lr): the lr at the lowest smoothed loss, and a tenth of it (fastai; Smith 2015). The
    minimum lies where the loss is about to blow up; a tenth of it is where the loss still falls fast."""
    min_loss_lr = float(lrs[int(np.argmin(smoothed))])
    return min_loss_lr, min_loss_lr / 10


def around(lr: float, count: int = 5, span: float = 10.0) -> list[float]:
    """count learning rates evenly spaced on a log scale from lr / span to lr * span, to 2 significant digits."""
    return [float(f"{value:.2g}") for value in np.geomspace(lr / span, lr * span, count)]


def carried(override: str) -> bool:
    """Whether an override of this run belongs in the sweep: all but the task's own and the lr the sweep sets."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key not in ("experiment", "task", "optimizer.lr") and key.split(".")[0] != "lr_find"


def sweep_command(lrs: Sequence[float], overrides: Sequence[str]) -> str:
    """`fashion-sweep --multirun experiment=lr_sweep <this run's other overrides> optimizer.lr=<lrs>`, shell-quoted."""
    rates = ",".join(f"{lr:g}" for lr in lrs)
    kept = [o for o in overrides if carried(o)]
    return shlex.join(["fashion-sweep", "--multirun", "experiment=lr_sweep", *kept, f"optimizer.lr={rates}"])


def run_name(cfg: DictConfig) -> str:
    return f"lr_find {cfg.model.name} {cfg.optimizer.name}"


def keras_step(cfg: DictConfig, split: data.Split, precision: str) -> Callable[[float], float]:
    """A fresh model and optimizer as cfg says, in that precision, and a function that trains it on the next batch
    of the training split (shuffled as a training run's) at a given learning rate and returns that batch's loss."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.trainer.seed)
    backend.set_precision(precision)  # as the sweep it suggests will train
    model = build_model(cfg.model)
    model.compile(optimizer=build_optimizer(cfg.optimizer), loss="sparse_categorical_crossentropy")
    batch_size, steps = cfg.trainer.batch_size, cfg.lr_find.steps
    epochs = math.ceil(steps / math.ceil(len(split.y_train) / batch_size))  # as many passes as the steps need
    batches = iter(pipeline.training_batches(split.x_train, split.y_train, batch_size, cfg.trainer.seed, 0, epochs))

    def step(lr: float) -> float:
        images, labels = next(batches)
        model.optimizer.learning_rate.assign(lr)  # a variable in every Keras 3 optimizer, read by each step
        # train_on_batch resets the metrics first: its "loss" is this batch's (fit's logs hold the epoch's mean)
        return float(model.train_on_batch(images, labels, return_dict=True)["loss"])

    return step


def log_trace(run_id: str, trace: Trace) -> None:
    """The trace as metrics TRACE_METRICS with step = batch index, in one request (MLflow splits it in chunks)."""
    now = int(time.time() * 1000)
    rows = zip(trace.lrs, trace.losses, trace.smoothed, strict=True)
    metrics = [
        Metric(name, value, now, batch)
        for batch, values in enumerate(rows)
        for name, value in zip(TRACE_METRICS, values, strict=True)
    ]
    MlflowClient().log_batch(run_id, metrics=metrics)


def lr_find(cfg: DictConfig) -> float:
    """The LR range test cfg.lr_find describes, in one MLflow run tagged task=lr_find; prints the suggestion and a
    sweep command around it, and returns the suggested learning rate."""
    experiment_id = runs.connect(cfg.tracking)
    lrs = schedule(cfg.lr_find.start_lr, cfg.lr_find.end_lr, cfg.lr_find.steps)
    job = continuation.job_context(cfg.trainer.epochs)  # only its overrides and launch: a range test is not continued
    tags = {**tracking.run_tags(job), runs.TASK_TAG: "lr_find"}
    with runs.run(experiment_id, run_name(cfg), tags, parent_run_id=None) as run_id:
        tracking.log_config(cfg, job.overrides)
        split, dataset = data.split_for(cfg)
        tracking.log_data_source(dataset.source, data.SHA256)
        mlflow.log_params({"n_train": len(split.y_train)})
        precision, why = backend.precision_here(cfg.trainer.precision)
        mlflow.set_tags({"precision": precision, "precision_reason": why})
        train_step = keras_step(cfg, split, precision)
        started = time.perf_counter()
        trace = range_test(train_step, lrs, cfg.lr_find.smoothing, cfg.lr_find.stop_factor)
        seconds = time.perf_counter() - started
        if len(trace.lrs) < 2:
            raise ValueError(f"the LR range test stopped at once: {trace.stopped}; lower lr_find.start_lr")
        min_loss_lr, suggested_lr = suggestion(trace.lrs, trace.smoothed)
        command = sweep_command(around(suggested_lr), job.overrides)
        log_trace(run_id, trace)
        mlflow.log_metrics({"suggested_lr": suggested_lr, "min_loss_lr": min_loss_lr, "lr_find_seconds": seconds})
        mlflow.set_tags({"lr_find_stopped": trace.stopped, "sweep_command": command})
        figure = plots.lr_find(trace.lrs, trace.losses, trace.smoothed, min_loss_lr, suggested_lr)
        mlflow.log_figure(figure, "lr_find.png")

    lowest = int(np.argmin(trace.smoothed))
    if lowest == len(trace.lrs) - 1:
        log.warning("The smoothed loss was still falling at the last batch: raise lr_find.end_lr or lr_find.steps")
    elif lowest == 0:
        log.warning("The smoothed loss rose from the first batch on: lower lr_find.start_lr")
    print(
        f"LR range test {run_name(cfg)!r} (run {run_id}): {len(trace.lrs)} batches of {cfg.trainer.batch_size}, "
        f"lr {trace.lrs[0]:.2g} to {trace.lrs[-1]:.2g} in {seconds:.0f} s; stopped: {trace.stopped}.\n"
        f"Lowest smoothed loss {trace.smoothed[lowest]:.3g} at lr {min_loss_lr:.2g}; {RULE}: {suggested_lr:.2g}.\n"
        f"Sweep 5 rates from a tenth to 10x the suggestion:\n{command}",
        flush=True,
    )
    return suggested_lr
