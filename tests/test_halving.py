"""`hydra/sweeper=halving`: the rung schedule, and real sweeps that prune, continue survivors in place, resume."""

from __future__ import annotations

import csv
import math
import signal
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fashion_sweep.halving import check_plan, expand, rungs, survivors
from tests.conftest import all_runs, fashion_sweep, store_uri
from tests.test_resume import EPOCH_METRICS, launch, resume, steps, stop_after

# 0.3 diverges in its first epoch, 1e-5 barely moves; 0.001 is the clear winner on 2,000 images after 3 epochs.
HALVING = ["--multirun", "hydra/sweeper=halving", "optimizer.lr=0.00001,0.0001,0.001,0.3", "data.train_size=2000",
           "trainer.epochs=3"]  # fmt: skip


@pytest.mark.parametrize(
    ("epochs", "min_epochs", "eta", "expected"),
    [(10, 1, 3, [1, 3, 10]), (20, 2, 3, [2, 6, 20]), (3, 1, 3, [1, 3]), (2, 1, 3, [2]), (8, 1, 2, [1, 2, 4, 8])],
)
def test_rungs_grow_by_eta_and_end_at_the_last_epoch(epochs: int, min_epochs: int, eta: int, expected) -> None:
    assert rungs(epochs, min_epochs, eta) == expected


def test_the_best_ceil_n_over_eta_go_on_and_never_a_diverged_job() -> None:
    assert survivors([0.5, 0.3, 0.9, 0.4, 0.8], eta=3) == [1, 3]
    assert survivors([math.inf, 0.7, math.nan], eta=2) == [1]
    assert survivors([math.inf, math.inf], eta=3) == []


def test_jobs_expand_as_the_basic_sweeper_expands_them_command_line_winning_key_by_key() -> None:
    params = {"optimizer.lr": "0.001,0.01", "trainer.seed": "1,2"}
    jobs = expand(params, ["trainer.seed=7", "data.train_size=100"])
    parsed = OverridesParser.create().parse_overrides(
        ["optimizer.lr=0.001,0.01", "trainer.seed=7", "data.train_size=100"]
    )
    assert jobs == BasicSweeper.split_arguments(parsed, None)[0]
    assert jobs == [
        ["optimizer.lr=0.001", "trainer.seed=7", "data.train_size=100"],
        ["optimizer.lr=0.01", "trainer.seed=7", "data.train_size=100"],
    ]


@pytest.mark.parametrize(
    ("eta", "min_epochs", "jobs", "message"),
    [
        (1, 1, [["optimizer.lr=0.1"]], "hydra.sweeper.eta=1 must be a whole number >= 2"),
        (3, 11, [["optimizer.lr=0.1"]], "hydra.sweeper.min_epochs=11 must be a whole number in [1, trainer.epochs=10]"),
        (3, 1, [["trainer.epochs=2"], ["trainer.epochs=4"]], "trainer.epochs sets the last rung"),
    ],
)
def test_settings_halving_cannot_run_are_refused(eta: int, min_epochs: int, jobs, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_plan(jobs, eta, min_epochs, epochs=10)


def sweep_runs(tmp: Path) -> tuple[Run, dict[str, Run]]:
    runs = all_runs(tmp)
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    return parent, {r.data.params["optimizer.lr"]: r for r in runs if r is not parent}


def check_halved(tmp: Path) -> None:
    """What every finished halving sweep of HALVING shows: 4 runs for 4 rates (survivors continued in place), two
    pruned after epoch 1 (one of them diverged), two trained epochs 1..3 each once, nothing left open."""
    parent, jobs = sweep_runs(tmp)
    assert sorted(jobs) == ["0.0001", "0.001", "0.3", "1e-05"] and len(all_runs(tmp)) == 5
    assert parent.info.status == "FINISHED" and parent.data.tags["halving_rungs"] == "1,3"
    assert parent.data.params["best_lr"] == "0.001"
    pruned = {lr for lr, run in jobs.items() if run.data.tags.get("pruned") == "true"}
    assert pruned == {"1e-05", "0.3"}
    for lr, run in jobs.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == ("FAILED" if lr == "0.3" else "FINISHED")  # a diverged run stays what it was
        if lr in pruned:
            assert run.data.tags["pruned_at_epoch"] == "1" and "test_accuracy" not in run.data.metrics
            assert steps(tmp, run) == {m: [1] for m in EPOCH_METRICS}
        else:
            assert steps(tmp, run) == {m: [1, 2, 3] for m in EPOCH_METRICS}  # continued, not restarted
            fit_seconds = MlflowClient(store_uri(tmp / "mlruns")).get_metric_history(run.info.run_id, "fit_seconds")
            assert sorted(m.step for m in fit_seconds) == [1, 3]  # once per rung, at the epoch it reached
            assert ("test_accuracy" in run.data.metrics) == (lr == "0.001")  # the test set: the selected run alone
    assert (tmp / "multirun" / "multirun.yaml").is_file() and (tmp / "multirun" / "report" / "summary.csv").is_file()


@pytest.fixture(scope="module")
def halved(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("halving")
    proc = fashion_sweep(tmp, *HALVING, "trainer.verbose=0", "tracking.log_model=false")
    assert proc.returncode == 0, proc.stderr
    return tmp, proc


def test_halving_prunes_and_continues_survivors_in_their_own_runs(halved) -> None:
    tmp, proc = halved
    check_halved(tmp)
    assert "Halving rung 2/2: 2 jobs from epoch 1 up to epoch 3" in proc.stdout
    assert sorted(p.name for p in (tmp / "multirun").iterdir() if p.name.isdigit()) == list("012345")
    assert proc.stdout.count("goes on with its model kept in memory since epoch 1") == 2  # not rebuilt, not retraced


def same_training(tmp: Path, other: Path) -> None:
    """The survivors of two halving sweeps of HALVING trained alike, epoch by epoch, to the last bit."""
    histories = []
    for folder in (tmp, other):
        client, (_, jobs) = MlflowClient(store_uri(folder / "mlruns")), sweep_runs(folder)
        histories.append({(lr, name): [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
                          for lr, run in jobs.items() for name in ("loss", "val_loss", "val_accuracy")})  # fmt: skip
    mine, theirs = histories
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert sorted(mine[key]) == sorted(theirs[key]), key


def test_the_report_compares_all_runs_at_each_rung_and_ranks_the_pruned_after(halved) -> None:
    tmp, proc = halved
    with open(tmp / "multirun" / "report" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optimizer.lr"], r["status"]) for r in rows][:2] == [("0.001", "FINISHED"), ("0.0001", "FINISHED")]
    assert sorted(r["status"] for r in rows[2:]) == ["DIVERGED", "PRUNED"]
    assert all(r["val_loss@1"] for r in rows) and [bool(r["val_loss@3"]) for r in rows] == [True, True, False, False]
    assert "val_loss@1 | val_loss@3" in proc.stdout  # the table printed at the end


def test_halving_under_joblib_into_a_new_store(tmp_path: Path, halved) -> None:
    assert not (tmp_path / "mlruns").exists()  # two workers meet a new SQLite store: nothing may be lost
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = fashion_sweep(tmp_path, *HALVING, *joblib, "trainer.verbose=0", "tracking.log_model=false")
    assert proc.returncode == 0, proc.stderr
    check_halved(tmp_path)
    assert "kept in memory" not in proc.stdout  # workers restore from the checkpoint ...
    same_training(tmp_path, halved[0])  # ... and train on exactly as a survivor that kept its model in the sweeper


def test_halving_sweep_killed_in_its_second_rung_resumes_there(tmp_path: Path) -> None:
    stop_after(launch(tmp_path, *HALVING), "% done, ~", 5, signal.SIGKILL)  # rung 1 (4 epochs) done, 1 of rung 2
    parent, jobs = sweep_runs(tmp_path)
    assert parent.info.status == "RUNNING"
    assert sorted(run.info.status for run in jobs.values()) == ["FAILED", "FINISHED", "RUNNING", "SCHEDULED"]
    continued = {lr: run.info.run_id for lr, run in jobs.items()}

    proc = resume(tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_halved(tmp_path)
    assert {lr: run.info.run_id for lr, run in sweep_runs(tmp_path)[1].items()} == continued


def test_halving_settings_are_checked_before_any_run(tmp_path: Path) -> None:
    proc = fashion_sweep(tmp_path, *HALVING, "hydra.sweeper.eta=1", "trainer.verbose=0")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "fashion-sweep: hydra.sweeper.eta=1 must be a whole number >= 2; nothing was run"
    )
    assert not (tmp_path / "mlruns").exists() or not all_runs(tmp_path)


def test_every_epoch_says_rung_job_epoch_and_time_left_and_the_parent_shows_it(halved) -> None:
    tmp, proc = halved
    lines = [line.split(" - ", 1)[1] for line in proc.stdout.splitlines() if "% done, ~" in line]
    assert [line.split(" · ")[:3] for line in lines] == [
        ["rung 1/2", "job 1/4", "epoch 1/1"],
        ["rung 1/2", "job 2/4", "epoch 1/1"],
        ["rung 1/2", "job 3/4", "epoch 1/1"],
        ["rung 1/2", "job 4/4", "epoch 1/1"],
        ["rung 2/2", "job 1/2", "epoch 2/3"],
        ["rung 2/2", "job 1/2", "epoch 3/3"],
        ["rung 2/2", "job 2/2", "epoch 2/3"],
        ["rung 2/2", "job 2/2", "epoch 3/3"],
    ]
    assert [line.split(" · ")[3].split("%")[0] for line in lines] == ["12", "25", "37", "50", "62", "75", "87", "100"]
    assert "\r" not in proc.stdout  # a log file reads as well as the terminal
    parent, _ = sweep_runs(tmp)
    assert parent.data.tags["progress"].startswith("finished after ")


def test_each_run_logs_its_training_validation_and_test_images_as_datasets(halved) -> None:
    tmp, _ = halved
    _, jobs = sweep_runs(tmp)
    digests = {}
    for lr, run in jobs.items():
        inputs = {tag.value: entry.dataset for entry in run.inputs.dataset_inputs for tag in entry.tags}
        assert sorted(inputs) == ["test", "training", "validation"]
        assert {dataset.name for dataset in inputs.values()} == {"fashion-mnist"}
        assert "/usr/share/datasets/fashion-mnist" in inputs["training"].source
        digests[lr] = {context: dataset.digest for context, dataset in inputs.items()}
    assert len({tuple(sorted(d.items())) for d in digests.values()}) == 1  # same images for every learning rate
    assert len(set(digests["0.001"].values())) == 3  # three different slices
