"""Schedule-free AdamW evaluated at its average x, trained at y, and the sweep-free control beside a grid: real
training on slices of the real data, a real store, the real console scripts."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from fashion_sweep import checkpoint, compare, config, control, data, plots, schedule_free
from fashion_sweep.models import build_model, cnn_bn
from fashion_sweep.optimizers import build_optimizer
from tests.conftest import QUICK, all_runs, fashion_sweep, store_uri
from tests.test_resume import SAME_TRAINING, history, launch, resume, steps, stop_after

SCHEDULE_FREE = ["optimizer=schedule_free_adamw", "model=cnn_bn", "model.filters=[8]", "model.dense_units=32"]


@pytest.fixture(scope="module")
def images(fashion_dir: Path) -> data.Split:
    return data.split(data.load(fashion_dir), val_fraction=0.1, train_size=1000, seed=0)


def small_model(optimizer: keras.optimizers.Optimizer | None = None) -> keras.Model:
    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    model = cnn_bn([8], 0.0, 16, 0.0, convs_per_block=1)
    optimizer = optimizer or schedule_free.ScheduleFreeAdamW(0.0025)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


class StepSequence(keras.callbacks.Callback):
    """The optimizer's z (its `momentum` slots) after every step, for an independent average."""

    def __init__(self) -> None:
        super().__init__()
        self.z: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.z.append([keras.ops.convert_to_numpy(m) for m in self.model.optimizer._momentums])


def average_error(model: keras.Model, images: data.Split, warmup_steps: int) -> float:
    """After 10 steps: the largest difference between x and the average of z_1..z_10, each z_t weighted by lr_t^2
    (the reference's weights: lr_t = lr min(t / warmup, 1))."""
    steps_seen = StepSequence()
    model.fit(images.x_train[:640], images.y_train[:640], batch_size=64, epochs=1, verbose=0, callbacks=[steps_seen])
    t = np.arange(1, len(steps_seen.z) + 1)
    weights = np.minimum(t / warmup_steps, 1) ** 2 if warmup_steps else np.ones(len(t))
    x = schedule_free.averaged_weights(model)
    averages = [np.tensordot(weights / weights.sum(), np.stack([z[i] for z in steps_seen.z]), 1) for i in range(len(x))]
    return max(float(np.abs(value - mean).max()) for value, mean in zip(x, averages, strict=True))


@pytest.mark.parametrize("warmup_steps", [0, 4])
def test_the_average_is_the_lr_squared_weighted_mean_of_the_steps(images: data.Split, warmup_steps: int) -> None:
    model = small_model(schedule_free.ScheduleFreeAdamW(0.0025, warmup_steps=warmup_steps))
    assert average_error(model, images, warmup_steps) < 1e-6  # float32 rounding alone
    y = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    x = schedule_free.averaged_weights(model)
    assert max(float(np.abs(a - b).max()) for a, b in zip(x, y, strict=True)) > 1e-4  # y is not x
    still = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(still, y, strict=True))  # the model itself stays at y


def first_step(optimizer: keras.optimizers.Optimizer, images: data.Split) -> float:
    """The largest change of a weight in the first step of model.fit."""
    model = small_model(optimizer)
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    model.fit(images.x_train[:64], images.y_train[:64], batch_size=64, epochs=1, verbose=0)
    after = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    return max(float(np.abs(a - b).max()) for a, b in zip(after, before, strict=True))


def test_keras_3_15s_own_schedule_free_adamw_is_not_averaging(images: data.Split) -> None:
    """Why schedule_free.ScheduleFreeAdamW exists: if this fails, Keras has mended its update and ours can go."""
    model = small_model(keras.optimizers.ScheduleFreeAdamW(0.0025))
    assert average_error(model, images, 0) > 1e-5
    assert first_step(keras.optimizers.ScheduleFreeAdamW(0.0025), images) > 0.1  # the weights replaced by +-lr
    assert first_step(schedule_free.ScheduleFreeAdamW(0.0025), images) <= 0.0025 * 1.001  # one Adam step of lr


def test_batch_norm_statistics_are_recomputed_at_the_average(images: data.Split) -> None:
    model = small_model()
    model.fit(images.x_train[:640], images.y_train[:640], batch_size=64, epochs=1, verbose=0)
    bn = schedule_free.batch_norm_layers(model)[0]
    during_training = keras.ops.convert_to_numpy(bn.moving_mean)
    schedule_free.to_average(model, images.x_train, batch_size=64)
    conv = model.layers[0]  # the first BatchNormalization's input is the first convolution's output, at x now
    starts = range(0, len(images.x_train), 64)[: schedule_free.BATCH_NORM_BATCHES]
    used = [keras.ops.convert_to_numpy(conv(images.x_train[i : i + 64])) for i in starts]
    expected_mean = np.mean([b.mean(axis=(0, 1, 2)) for b in used], axis=0)
    expected_var = np.mean([b.var(axis=(0, 1, 2)) for b in used], axis=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), expected_mean, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), expected_var, rtol=1e-3, atol=1e-5)
    assert not np.allclose(during_training, expected_mean, rtol=1e-2)  # not what training's moving average held
    assert bn.momentum == 0.99  # the layer's own momentum is back


@pytest.fixture(scope="module")
def schedule_free_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("schedule_free")
    proc = fashion_sweep(tmp, *SCHEDULE_FREE, "data.train_size=2000", "trainer.epochs=2", "trainer.verbose=0",
                         "trainer.precision=float32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run,) = all_runs(tmp)
    return tmp, run


def test_validation_and_the_logged_model_are_the_average(schedule_free_run, fashion_dir: Path) -> None:
    tmp, run = schedule_free_run
    client = MlflowClient(store_uri(tmp / "mlruns"))
    (logged,) = client.search_logged_models([run.info.experiment_id])
    served = mlflow.keras.load_model(logged.artifact_location)
    split = data.split(data.load(fashion_dir), val_fraction=0.1, train_size=2000, seed=42)
    raw = np.round(split.x_val * 255).astype(np.uint8)[..., 0]  # what the served model takes: raw pixels

    def val_loss(model: keras.Model, images: np.ndarray) -> float:
        probabilities = model.predict(images, batch_size=256, verbose=0)
        return float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(split.y_val, probabilities)))

    logged_val_loss = run.data.metrics["val_loss"]  # the last epoch's, computed inside model.fit
    assert val_loss(served, raw) == pytest.approx(logged_val_loss, rel=1e-5)

    keras.backend.clear_session()  # fresh layer names: the checkpoint's variable paths
    at_y = build_model(compose_job(SCHEDULE_FREE).model)  # the checkpoint holds y: training goes on from there
    checkpoint.restore_weights(at_y, checkpoint.load_from_run(run))
    assert abs(val_loss(at_y, split.x_val) - logged_val_loss) > 1e-3  # so the test can tell x from y


def test_a_ctrl_c_schedule_free_run_resumed_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    job = [*SCHEDULE_FREE, "data.train_size=2000", "trainer.epochs=3"]
    whole_tmp = tmp_path / "whole"
    whole_tmp.mkdir()
    proc = launch(whole_tmp, *job)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    (whole,) = all_runs(whole_tmp)

    output = stop_after(launch(tmp_path, *job), "val_loss", 1, signal.SIGINT)
    assert "interrupted; run" in output and "Traceback" not in output
    (killed,) = all_runs(tmp_path)
    assert killed.info.status == "KILLED" and killed.data.tags["checkpoint_epoch"] in ("1", "2")
    proc = resume(tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED" and steps(tmp_path, run)["val_loss"] == [1, 2, 3]
    for metric in SAME_TRAINING:  # training went on from y: every epoch the same, to the last bit
        assert history(tmp_path, run, metric) == history(whole_tmp, whole, metric), metric
    assert run.data.metrics["test_accuracy"] == whole.data.metrics["test_accuracy"]


def compose_job(overrides: list[str]):
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        return compose("config", overrides=overrides)


def test_schedule_free_takes_no_schedule_and_builds_at_the_methods_defaults() -> None:
    cfg = compose_job(["optimizer=schedule_free_adamw"])
    optimizer = build_optimizer(cfg.optimizer, total_steps=100)
    assert isinstance(optimizer, keras.optimizers.ScheduleFreeAdamW)
    assert (float(optimizer.learning_rate), optimizer.beta_1, optimizer.warmup_steps) == (pytest.approx(0.0025), 0.9, 0)
    with pytest.raises(config.ConfigError, match="optimizer.schedule='cosine' is not allowed with optimizer=sch"):
        config.validate(compose_job(["optimizer=schedule_free_adamw", "optimizer.schedule=cosine"]), {}, build=False)


def test_the_control_trains_the_grids_model_with_its_own_optimizer_once_per_seed() -> None:
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        preset = ["experiment=best_cnn", "trainer.precision=bfloat16"]  # best_cnn's variant where bfloat16 pays
        primary = compose("config", overrides=[*preset, "control=sweep_free"], return_hydra_config=True)
        shared = [*preset, "control=sweep_free", "optimizer.lr=0.001"]
        grid = [[*shared, f"trainer.seed={s}"] for s in (1, 2)]
        jobs = control.jobs(primary, grid)
        assert [job[-1] for job in jobs] == ["trainer.seed=1", "trainer.seed=2"]
        composed = compose("config", overrides=jobs[0], return_hydra_config=True)
    choices = dict(composed.hydra.runtime.choices)
    with open_dict(composed):
        del composed["hydra"]
    assert (choices["model"], choices["optimizer"]) == ("cnn_bn", "schedule_free_adamw")  # best_cnn's model only
    assert (composed.optimizer.lr, composed.optimizer.schedule, composed.trainer.epochs) == (0.0025, "constant", 16)
    assert list(composed.model.filters) == [16, 32]
    config.validate(composed, choices, build=False)
    assert control.jobs(compose_job(["control=none"]), grid) == []


def test_the_control_appears_in_the_report_its_figure_and_the_parents_tags(tmp_path: Path) -> None:
    proc = fashion_sweep(tmp_path, "--multirun", "optimizer.lr=0.001,0.01", "trainer.seed=1,2", "control=sweep_free",
                         *QUICK, "tracking.log_model=false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(store_uri(tmp_path / "mlruns"))
    runs = all_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    controls = [r for r in runs if r.data.tags.get("control") == "sweep_free"]
    grid = [r for r in runs if r is not parent and r not in controls]
    assert len(grid) == 4 and sorted(r.data.params["trainer.seed"] for r in controls) == ["1", "2"]
    assert {r.data.params["optimizer.name"] for r in controls} == {"schedule_free_adamw"}
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in controls)  # scored in job
    assert parent.info.status == "FINISHED" and parent.data.params["best_lr"] in ("0.001", "0.01")

    report = compare.write_report(client, parent, tmp_path / "report")
    assert [row[compare.CONTROL] for row in report.table] == ["", "", "sweep-free, lr 0.0025"]
    assert report.best is not None and report.best[compare.LR] != "0.0025"
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| sweep-free, lr 0.0025 | 0.0025 | 2 | 2 |" in summary and parent.data.tags["control_verdict"] in summary
    control_loss = np.mean([min(v for _, v in history(tmp_path, r, "val_loss")) for r in controls])
    gain = float(parent.data.tags["grid_gain_val_loss"])
    assert gain == pytest.approx(control_loss - report.best["best_val_loss"], rel=1e-4)
    assert ("beat" if gain > 0 else "lost to") in parent.data.tags["control_verdict"]
    assert parent.data.tags["control_epochs"] == "2" and parent.data.tags["grid_epochs"] == "4"
    assert "sweep-free, lr 0.0025" in (tmp_path / "multirun" / "report" / "summary.md").read_text()

    label, lr, train, val = compare.control_point(report.controls)
    assert (label, lr) == ("sweep-free, lr 0.0025", 0.0025) and math.isfinite(val)
    figure = plots.lr_effect(compare.lr_series(report.rows, [compare.LR]), 0.001, None, None, (label, lr, train, val))
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert "sweep-free, lr 0.0025: final validation loss" in legend
    (line,) = [ln for ln in figure.axes[0].lines if ln.get_label() == "sweep-free, lr 0.0025: final validation loss"]
    assert line.get_ydata()[0] == pytest.approx(val)
