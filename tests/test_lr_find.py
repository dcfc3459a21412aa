"""The LR range test: its pure parts (schedule, smoothing, stop rule, suggestion, sweep command) and one real run."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from fashion_sweep import data
from fashion_sweep.backend import choose_precision, cpu_flags, cpu_vendor, set_precision
from fashion_sweep.config import ConfigError, validate
from fashion_sweep.lr_find import (
    TRACE_METRICS,
    around,
    blew_up,
    keras_step,
    range_test,
    schedule,
    smoothed,
    suggestion,
    sweep_command,
)
from tests.conftest import all_runs, fashion_sweep, run_script, store_uri


def check_jobs_of(command: str) -> list[str]:
    """Compose and validate every job of a printed `fashion-sweep --multirun ...` command as its launch would;
    return the job's learning rates."""
    program, flag, *overrides = shlex.split(command)
    assert (program, flag) == ("fashion-sweep", "--multirun")
    (swept,) = [o for o in overrides if o.startswith("optimizer.lr=")]
    rates = swept.removeprefix("optimizer.lr=").split(",")
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        for rate in rates:
            job = [*(o for o in overrides if o != swept), f"optimizer.lr={rate}"]
            cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
            with open_dict(cfg):
                choices = cfg.hydra.runtime.choices
                del cfg["hydra"]
            validate(cfg, choices, build=False)
            assert cfg.task == "train" and cfg.optimizer.lr == float(rate)
    return rates


def test_schedule_rises_by_a_constant_factor_from_start_lr_to_end_lr() -> None:
    lrs = schedule(1e-7, 10.0, 100)
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(1e-7, rel=1e-12) and lrs[-1] == pytest.approx(10.0, rel=1e-12)
    ratios = np.diff(np.log(lrs))
    assert np.allclose(ratios, math.log(1e8) / 99)


def test_smoothing_is_a_bias_corrected_moving_average() -> None:
    assert smoothed([2.0, 2.0, 2.0], 0.98) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    assert smoothed([1.0, 2.0], 0.5) == pytest.approx([1.0, (0.5 * 1 + 1 * 2) / 1.5])  # weights beta**age
    assert smoothed([3.0, 1.0, 4.0], 0.0) == [3.0, 1.0, 4.0]  # beta 0: the raw losses


def test_range_test_stops_when_the_smoothed_loss_exceeds_4x_its_best() -> None:
    assert not blew_up(2.0, 0.5, 4.0) and blew_up(2.01, 0.5, 4.0) and blew_up(math.nan, 0.5, 4.0)
    losses = iter([1.0, 0.5, 1.9, 2.0, 2.1, 0.1, 0.1])
    trace = range_test(lambda lr: next(losses), schedule(1e-3, 1.0, 7), beta=0.0, stop_factor=4.0)
    assert trace.losses == [1.0, 0.5, 1.9, 2.0, 2.1]  # the batch that blew up is recorded, none after it
    assert "exceeded 4 x its lowest (0.5) at batch 4" in trace.stopped


def test_range_test_smooths_as_smoothed_and_stops_before_a_nan_loss() -> None:
    losses = iter([2.3, 2.2, 2.0, 1.7, math.nan, 1.0])
    trace = range_test(lambda lr: next(losses), schedule(1e-4, 1.0, 6), beta=0.98, stop_factor=4.0)
    assert trace.losses == [2.3, 2.2, 2.0, 1.7]
    assert trace.smoothed == pytest.approx(smoothed(trace.losses, 0.98))
    assert trace.stopped.startswith("the training loss became nan at batch 4")


def test_suggestion_is_a_tenth_of_the_lr_at_the_lowest_smoothed_loss() -> None:
    lrs = schedule(1e-7, 10.0, 81)  # 10 per decade: 0.01 is on the grid
    curve = [1 + (math.log10(lr) + 2) ** 2 for lr in lrs]  # lowest at lr 0.01
    min_loss_lr, suggested_lr = suggestion(lrs, curve)
    assert min_loss_lr == pytest.approx(0.01) and suggested_lr == pytest.approx(0.001)


def test_range_test_on_a_falling_then_exploding_curve_suggests_below_the_blow_up() -> None:
    def loss(lr: float) -> float:  # flat at 2.3, falling from 1e-4 to a floor of 0.5 at 1e-2, exploding above 0.1
        return 2.3 - 1.8 * min(max(math.log10(lr / 1e-4) / 2, 0), 1) + (0 if lr < 0.1 else 100 * (lr - 0.1))

    trace = range_test(loss, schedule(1e-7, 10.0, 100), beta=0.98, stop_factor=4.0)
    assert trace.lrs[-1] < 10.0 and "exceeded 4 x" in trace.stopped
    min_loss_lr, suggested_lr = suggestion(trace.lrs, trace.smoothed)
    assert 1e-2 <= min_loss_lr <= 0.5 and suggested_lr == pytest.approx(min_loss_lr / 10)


def test_sweep_rates_span_a_tenth_to_10x_the_suggestion_on_a_log_scale() -> None:
    assert around(3e-4) == [3e-05, 9.5e-05, 0.0003, 0.00095, 0.003]
    assert around(0.0012328) == [0.00012, 0.00039, 0.0012, 0.0039, 0.012]


def test_sweep_command_keeps_the_users_overrides_and_every_job_composes() -> None:
    overrides = [
        "experiment=lr_find", "lr_find.steps=50", "+lr_find.extra=1", "model=cnn_bn", "optimizer=adam",
        "optimizer.beta_1=0.8", "optimizer.lr=0.5", "trainer.batch_size=64", "data.train_size=2000",
        "model.filters=[16,32]",
    ]  # fmt: skip
    command = sweep_command(around(3e-4), overrides)
    assert command == (
        "fashion-sweep --multirun experiment=lr_sweep model=cnn_bn optimizer=adam optimizer.beta_1=0.8 "
        "trainer.batch_size=64 data.train_size=2000 'model.filters=[16,32]' "
        "optimizer.lr=3e-05,9.5e-05,0.0003,0.00095,0.003"
    )
    assert check_jobs_of(command) == ["3e-05", "9.5e-05", "0.0003", "0.00095", "0.003"]


def test_lr_find_preset_is_one_checked_run_not_a_sweep() -> None:
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        cfg = compose(config_name="config", overrides=["experiment=lr_find"], return_hydra_config=True)
    assert cfg.task == "lr_find" and not cfg.hydra.sweeper.get("params")
    assert (cfg.lr_find.start_lr, cfg.lr_find.end_lr, cfg.lr_find.steps) == (1e-7, 10.0, 100)
    assert (cfg.lr_find.smoothing, cfg.lr_find.stop_factor) == (0.98, 4.0)  # fastai's
    with open_dict(cfg):
        choices = cfg.hydra.runtime.choices
        del cfg["hydra"]
    validate(cfg, choices)  # builds the model and optimizer too


REFUSED = [
    ("lr_find.end_lr=1e-8", r"lr_find.end_lr=1e-08 is not allowed: expected a number > lr_find.start_lr=1e-07"),
    ("lr_find.start_lr=0", r"lr_find.start_lr=0 is not allowed: expected a number > 0"),
    ("lr_find.steps=1", r"lr_find.steps=1 is not allowed: expected a whole number >= 2"),
    ("lr_find.smoothing=1", r"lr_find.smoothing=1 is not allowed: expected a number in \[0, 1\)"),
    ("lr_find.stop_factor=1", r"lr_find.stop_factor=1 is not allowed: expected a number > 1"),
    ("task=predict", r"task='predict' is not allowed: expected one of \['train', 'lr_find'\]"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED, ids=[o for o, _ in REFUSED])
def test_out_of_range_lr_find_settings_are_refused(override: str, message: str) -> None:
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        cfg = compose(config_name="config", overrides=["experiment=lr_find", override], return_hydra_config=True)
    with open_dict(cfg):
        choices = cfg.hydra.runtime.choices
        del cfg["hydra"]
    with pytest.raises(ConfigError, match=message):
        validate(cfg, choices, build=False)


@pytest.fixture(scope="module")
def lr_find_run(tmp_path_factory: pytest.TempPathFactory):
    """`fashion-sweep experiment=lr_find` on 2,000 real images (100 batches: 7 passes over the 1,800 training ones)."""
    tmp = tmp_path_factory.mktemp("range_test")
    proc = fashion_sweep(tmp, "experiment=lr_find", "data.train_size=2000", "trainer.verbose=0")
    assert proc.returncode == 0, proc.stderr
    (run,) = all_runs(tmp)
    return tmp, proc, run


def test_the_range_test_trains_in_the_precision_it_is_given(fashion_dir: Path) -> None:
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        cfg = compose(config_name="config", overrides=["model.filters=[8]", "model.dense_units=16"])
    split = data.split(data.load(fashion_dir), 0.1, 500, seed=42)
    try:
        step = keras_step(cfg, split, "bfloat16")
        policy = keras.mixed_precision.global_policy().name  # the model was built under it
        loss = step(1e-3)
    finally:
        set_precision("float32")
    assert policy == "mixed_bfloat16" and math.isfinite(loss)


def test_lr_find_is_one_finished_run_tagged_and_named_for_the_task(lr_find_run) -> None:
    _, _, run = lr_find_run
    assert run.info.status == "FINISHED"
    assert run.data.tags["task"] == "lr_find"
    assert run.info.run_name == "lr_find seed_cnn rmsprop"
    assert run.data.tags["precision"] == choose_precision("auto", cpu_flags(), cpu_vendor())[0]  # as training would


def test_lr_find_logs_the_trace_per_batch_and_a_suggestion_in_range(lr_find_run) -> None:
    tmp, _, run = lr_find_run
    client = MlflowClient(store_uri(tmp / "mlruns"))
    histories = {name: client.get_metric_history(run.info.run_id, name) for name in TRACE_METRICS}
    n = len(histories["lr_find_lr"])
    assert 2 <= n <= 100
    for name, history in histories.items():
        assert sorted(m.step for m in history) == list(range(n)), name
    lrs = [m.value for m in sorted(histories["lr_find_lr"], key=lambda m: m.step)]
    assert lrs[0] == pytest.approx(1e-7) and all(b > a for a, b in zip(lrs, lrs[1:], strict=False))
    metrics = run.data.metrics
    assert math.isfinite(metrics["suggested_lr"]) and 1e-7 <= metrics["suggested_lr"] <= 10
    assert metrics["suggested_lr"] == pytest.approx(metrics["min_loss_lr"] / 10)


def test_lr_find_leaves_a_figure_and_no_model(lr_find_run) -> None:
    tmp, _, run = lr_find_run
    client = MlflowClient(store_uri(tmp / "mlruns"))
    assert "lr_find.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "checkpoint" not in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "checkpoint" not in run.data.tags
    assert "test_accuracy" not in run.data.metrics
    assert client.search_logged_models([run.info.experiment_id]) == []


def test_lr_find_prints_the_rule_and_a_sweep_command_that_composes(lr_find_run) -> None:
    tmp, proc, run = lr_find_run
    assert "suggested lr = the lr at the lowest smoothed loss / 10" in proc.stdout
    (command,) = [line for line in proc.stdout.splitlines() if line.startswith("fashion-sweep --multirun")]
    assert command == run.data.tags["sweep_command"]
    overrides = shlex.split(command)[2:]
    assert overrides[0] == "experiment=lr_sweep" and "data.train_size=2000" in overrides
    assert not [o for o in overrides if o.startswith(("experiment=lr_find", "lr_find"))]
    rates = check_jobs_of(command)
    assert len(rates) == 5 and float(rates[2]) == pytest.approx(run.data.metrics["suggested_lr"], rel=0.05)


def test_resume_refuses_an_lr_range_test(lr_find_run) -> None:
    tmp, _, run = lr_find_run
    uri = store_uri(tmp / "mlruns")
    proc = run_script("fashion-sweep-resume", run.info.run_id, "--tracking-uri", uri, cwd=tmp, timeout=120)
    assert proc.returncode != 0
    assert "fashion-sweep-resume: an LR range test is not resumed; run it again" in proc.stderr


@pytest.mark.parametrize("sweep", ["task=train,lr_find"])  # a mixed sweep; experiment=lr_find takes the same path
def test_multirun_of_an_lr_range_test_is_refused_in_one_line_before_any_run(tmp_path: Path, sweep: str) -> None:
    proc = fashion_sweep(tmp_path, "--multirun", sweep, "data.train_size=1000", "trainer.epochs=1", timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["fashion-sweep: an LR range test is one run; drop --multirun"]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or all_runs(tmp_path) == []
