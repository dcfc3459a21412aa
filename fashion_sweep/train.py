"""One training run: data, model and optimizer from the config, model.fit, a test evaluation, all recorded.

Owns the order of a run and what it records when; the run's life in MLflow is tracking.py's, how figures
look is plots.py's.
"""

from __future__ import annotations

import logging
import math
import time

import keras
import mlflow
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fashion_sweep import data, plots, tracking
from fashion_sweep.models import build_model
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


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name} {cfg.optimizer.name} lr={cfg.optimizer.lr:g}"


def load_split(cfg: DictConfig) -> tuple[data.Split, data.FashionMNIST]:
    """Find, check and decode the data (once per process), then split it as cfg.data says."""
    folder = data.locate(cfg.data.dir, cfg.data.system_dir, cfg.data.cache_dir, cfg.data.url)
    dataset = data.load(folder)
    return data.split(dataset, cfg.data.val_fraction, cfg.data.train_size, cfg.trainer.seed), dataset


def train(cfg: DictConfig) -> float:
    """Train and evaluate as cfg says inside one MLflow run; return the lowest val_loss (inf if diverged)."""
    experiment_id = tracking.connect(cfg.tracking)
    tags = {"hydra_output_dir": HydraConfig.get().runtime.output_dir} if HydraConfig.initialized() else {}
    if commit := tracking.git_commit():
        tags["git_commit"] = commit
    try:
        with tracking.run(experiment_id, run_name(cfg), tags):
            return fit_and_record(cfg)
    except Diverged as err:
        log.warning("%s diverged: %s", run_name(cfg), err)
        return math.inf


def fit_and_record(cfg: DictConfig) -> float:
    """Inside the active run: log the config, load data, fit, evaluate on the test set, log figures and model."""
    tracking.log_config(cfg, list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [])
    split, dataset = load_split(cfg)
    tracking.log_data_source(dataset.source, data.SHA256)
    mlflow.log_params({"n_train": len(split.y_train), "n_val": len(split.y_val), "n_test": len(split.y_test)})
    keras.backend.clear_session()  # jobs of a sweep share this process: start each from a clean Keras state
    keras.utils.set_random_seed(cfg.trainer.seed)
    model = build_model(cfg.model)
    model.compile(
        optimizer=build_optimizer(cfg.optimizer), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )

    guard = DivergenceGuard(cfg.trainer.diverge_loss)
    started = time.perf_counter()
    history = model.fit(
        split.x_train,
        split.y_train,
        batch_size=cfg.trainer.batch_size,
        epochs=cfg.trainer.epochs,
        validation_data=(split.x_val, split.y_val),
        validation_batch_size=cfg.trainer.eval_batch_size,
        callbacks=[guard, tracking.EpochMetrics()],
        verbose=cfg.trainer.verbose,
    ).history
    mlflow.log_metric("fit_seconds", time.perf_counter() - started)
    if guard.reason is not None:
        mlflow.set_tag("diverged", "true")
        raise Diverged(f"{guard.reason}; training stopped")

    started = time.perf_counter()
    probabilities = model.predict(split.x_test, batch_size=cfg.trainer.eval_batch_size, verbose=0)
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
        tracking.log_model(model, split.x_test[:8], probabilities[:8])
    return min(history["val_loss"])
