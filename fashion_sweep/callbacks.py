"""The Keras callbacks of a training run: stop a diverging run, record each epoch, say how far the sweep is.

Owns per-epoch work inside model.fit (model.fit stays the loop). What is recorded where is decided by checkpoint.py
(the checkpoint), runs.py (the heartbeat) and parent.py (the sweep's progress line).
"""

from __future__ import annotations

import logging
import math
import time

import keras
import mlflow
from mlflow.tracking import MlflowClient

from fashion_sweep import checkpoint, parent, progress, runs

log = logging.getLogger(__name__)


class Diverged(Exception):
    """The training loss became NaN or exploded: a result of the learning rate, not a crash. Its note is the run's
    description."""

    def __init__(self, epoch: int, reason: str) -> None:
        super().__init__(f"{reason}; training stopped")
        self.note = f"Diverged in epoch {epoch}: {reason}."


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training when the training loss is NaN (checked every batch) or, at an epoch's end, above limit."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit = limit
        self.reason: str | None = None
        self.epoch = 0  # the epoch under way (from 1)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch + 1

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


class EpochRecorder(keras.callbacks.Callback):
    """Records each epoch to the active run, step = epoch (1, 2, ...): first a checkpoint (weights, optimizer and
    random state, the history so far), then every metric Keras reports for the epoch (those compiled, with val_
    twins) plus lr and epoch_seconds, then a heartbeat.

    A resumed run starts from the newest whole checkpoint, whose history holds every epoch it covers, so each
    epoch's metrics are logged exactly once even if the process dies between the two writes; an epoch the store
    already holds (the run went on from the checkpoint before a damaged one) is trained again, not logged again.
    """

    def __init__(
        self, history: dict[str, list[float]], fit_seconds_before: float, logged: frozenset[int] = frozenset()
    ) -> None:
        super().__init__()
        self.history = history  # every epoch so far, this fit's and those before a resume
        self.logged = logged  # epochs the store has metrics for (a run continued from an older checkpoint)
        self.fit_seconds_before = fit_seconds_before  # seconds inside model.fit before a resume
        self.fit_seconds = fit_seconds_before  # seconds inside model.fit, all fits of the run together

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._fit_started = time.perf_counter()
        self._named = False

    def on_train_end(self, logs: dict | None = None) -> None:
        self.fit_seconds = self.fit_seconds_before + time.perf_counter() - self._fit_started

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        metrics["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics["epoch_seconds"] = time.perf_counter() - self._started
        self.fit_seconds = self.fit_seconds_before + time.perf_counter() - self._fit_started
        for name, value in metrics.items():
            self.history.setdefault(name, []).append(value)
        checkpoint.log_to_run(checkpoint.capture(self.model, epoch + 1, self.history, self.fit_seconds))
        if epoch + 1 not in self.logged:
            mlflow.log_metrics(metrics, step=epoch + 1)
        if not self._named:  # once per fit: which metrics are per-epoch, for the report (runs.epoch_metrics)
            mlflow.set_tag(runs.EPOCH_METRICS_TAG, ",".join(metrics))
            self._named = True
        runs.heartbeat()


class ProgressLog(keras.callbacks.Callback):
    """After every epoch, logs where the sweep is (job i/n, epoch, time left) and mirrors it on the parent run."""

    def __init__(self, plan: progress.Plan, job_num: int, client: MlflowClient, parent_run_id: str | None) -> None:
        super().__init__()
        self.plan, self.job_num, self.client, self.parent_run_id = plan, job_num, client, parent_run_id

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        line = progress.describe(self.plan, self.job_num, epoch + 1, time.time())
        log.info(line)
        if self.parent_run_id:
            parent.record_progress(self.client, self.parent_run_id, line)


def progress_log(client: MlflowClient, parent_run_id: str | None, job_num: int, first_epoch: int, stop: int):
    """The sweep's plan, as its launcher wrote it on the parent run, and this job's number in it; a run outside
    a sweep plans its own epochs."""
    plan_json = client.get_run(parent_run_id).data.tags.get(progress.PLAN_TAG) if parent_run_id else None
    if plan_json is None:
        return ProgressLog(progress.single_run_plan(first_epoch, stop), 0, client, parent_run_id)
    return ProgressLog(progress.Plan.from_json(plan_json), job_num, client, parent_run_id)
