"""Sweeps end to end: `fashion-sweep --multirun` grouped in MLflow, its report, and `fashion-sweep-compare`."""

from __future__ import annotations

import csv
import math
import re
import signal
import subprocess
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fashion_sweep.compare import LR, TESTED_ONCE_IS, lr_series, rank, swept_keys
from fashion_sweep.config import TEST_SETS
from fashion_sweep.sweep import sweep_status
from tests.conftest import BIN, QUICK, all_runs, fashion_sweep, interruptible, run_script, store_uri

NOTE = "mlflow.note.content"
REPORT = ["lr_effect.png", "summary.csv", "summary.md", "val_curves.png"]
TEST_FIGURES = ["confusion_matrix.png", "misclassified.png"]
TEST_METRICS = {"test_accuracy", "test_loss", "test_seconds"}


def parent_and_children(tmp: Path) -> tuple[Run, list[Run]]:
    runs = all_runs(tmp)
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    return parent, [r for r in runs if r is not parent]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_multirun_groups_its_jobs_under_one_parent_run(lr_sweep) -> None:
    tmp, _ = lr_sweep
    parent, children = parent_and_children(tmp)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("sweep ")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["sweep_id"] for c in children} == {parent.data.tags["sweep_id"]} == {parent.info.run_id}
    assert len({c.info.experiment_id for c in [parent, *children]}) == 1
    assert sorted(float(c.data.params["optimizer.lr"]) for c in children) == [0.0003, 0.001, 0.003]


def test_jobs_in_one_process_decode_the_dataset_once(lr_sweep) -> None:
    _, proc = lr_sweep
    assert (proc.stdout + proc.stderr).count("Decoded Fashion-MNIST from") == 1


def test_parent_holds_the_report_and_the_best_lr(lr_sweep) -> None:
    tmp, proc = lr_sweep
    parent, children = parent_and_children(tmp)
    client = MlflowClient(store_uri(tmp / "mlruns"))
    files = sorted(a.path for a in client.list_artifacts(parent.info.run_id))
    assert files == sorted([*REPORT, *TEST_FIGURES, "sweep.yaml"])
    lowest = {c.data.params["optimizer.lr"]: min(p.value for p in client.get_metric_history(c.info.run_id, "val_loss"))
              for c in children}  # fmt: skip
    best_lr = min(lowest, key=lambda lr: lowest[lr])
    assert parent.data.params["best_lr"] == best_lr
    assert parent.data.metrics["best_lr"] == float(best_lr)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(lowest[best_lr])
    best_child = next(c for c in children if c.data.params["optimizer.lr"] == best_lr)
    assert parent.data.metrics["best_test_accuracy"] == best_child.data.metrics["test_accuracy"]
    assert "| optimizer.lr | best_val_loss |" in proc.stdout  # the table, printed in the terminal too


def scored(client: MlflowClient, run: Run) -> bool:
    """Whether run met the test set: its test metrics and figures, all of them or none (asserted)."""
    figures = {a.path for a in client.list_artifacts(run.info.run_id)} & set(TEST_FIGURES)
    metrics = TEST_METRICS & set(run.data.metrics)
    assert (figures, metrics) in [(set(), set()), (set(TEST_FIGURES), TEST_METRICS)], run.info.run_id
    return bool(metrics)


def test_a_sweep_meets_the_test_set_once_for_the_run_it_selected_on_validation(lr_sweep) -> None:
    tmp, proc = lr_sweep
    parent, children = parent_and_children(tmp)
    client = MlflowClient(store_uri(tmp / "mlruns"))
    (selected,) = [child for child in children if scored(client, child)]
    assert selected.data.params["optimizer.lr"] == parent.data.params["best_lr"]  # chosen on val_loss, then scored
    assert len(client.get_metric_history(selected.info.run_id, "test_accuracy")) == 1
    assert "selected by its sweep on validation loss, then scored: test accuracy" in selected.data.tags[NOTE]
    others = [child for child in children if child is not selected]
    assert all("the test set is scored once, for the setting the sweep selects" in c.data.tags[NOTE] for c in others)
    for name in ("test_accuracy", "test_loss"):  # the parent holds the selected run's scores and figures
        assert parent.data.metrics[name] == selected.data.metrics[name]
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert set(TEST_FIGURES) <= parent_files
    assert parent.data.tags["test_set"] == "selected"
    assert (proc.stdout + proc.stderr).count("Test set scored once, for the selected run") == 1
    summary = (tmp / "multirun" / "report" / "summary.md").read_text()
    assert TESTED_ONCE_IS in summary and TESTED_ONCE_IS in proc.stdout  # the report says why one row has a score
    rows = read_csv(tmp / "multirun" / "report" / "summary.csv")
    assert [r["test_accuracy"] != "nan" for r in rows] == [True, False, False]  # best first


def test_test_set_all_scores_every_job_as_the_sweep_scores_its_selected_one(tmp_path: Path, lr_sweep) -> None:
    proc = fashion_sweep(tmp_path, "-m", "optimizer.lr=0.0003,0.001,0.003", *QUICK, "tracking.log_model=false",
                         "tracking.test_set=all")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    parent, children = parent_and_children(tmp_path)
    client = MlflowClient(store_uri(tmp_path / "mlruns"))
    assert all(scored(client, child) for child in children) and "Test set scored once" not in proc.stdout + proc.stderr
    assert TESTED_ONCE_IS not in (tmp_path / "multirun" / "report" / "summary.md").read_text()
    _, before = parent_and_children(lr_sweep[0])
    (selected,) = [c for c in before if "test_accuracy" in c.data.metrics]
    same = next(c for c in children if c.data.params["optimizer.lr"] == selected.data.params["optimizer.lr"])
    # scored in its job or afterwards from its last checkpoint: the same network and weights, the same predictions
    assert same.data.metrics["test_accuracy"] == selected.data.metrics["test_accuracy"]
    assert same.data.metrics["test_loss"] == pytest.approx(selected.data.metrics["test_loss"], rel=1e-6)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test_accuracy"] == same.data.metrics["test_accuracy"]


def test_who_meets_the_test_set_in_its_job() -> None:
    from fashion_sweep.scoring import scored_in_job

    in_job = {(test_set, in_sweep): scored_in_job(test_set, in_sweep) for test_set in TEST_SETS for in_sweep in (0, 1)}
    assert in_job == {("selected", 0): True, ("selected", 1): False, ("all", 0): True, ("all", 1): True,
                      ("none", 0): False, ("none", 1): False}  # fmt: skip


def test_report_table_has_a_row_per_run_best_first(lr_sweep) -> None:
    tmp, _ = lr_sweep
    (report,) = (tmp / "multirun").glob("report")
    rows = read_csv(report / "summary.csv")
    assert len(rows) == 3
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)
    assert {r["status"] for r in rows} == {"FINISHED"} and {r["epochs"] for r in rows} == {"1"}
    assert "best = lowest validation loss reached in any epoch" in (report / "summary.md").read_text()


def test_diverging_lr_is_a_result_not_an_error(tmp_path: Path) -> None:
    proc = fashion_sweep(tmp_path, "-m", "optimizer=sgd", "optimizer.lr=0.01,10", *QUICK, "tracking.log_model=false")
    assert proc.returncode == 0, proc.stderr
    parent, children = parent_and_children(tmp_path)
    by_lr = {c.data.params["optimizer.lr"]: c for c in children}
    assert by_lr["10"].info.status == "FAILED" and by_lr["10"].data.tags["diverged"] == "true"
    assert by_lr["0.01"].info.status == "FINISHED" and "diverged" not in by_lr["0.01"].data.tags
    assert parent.info.status == "FINISHED" and parent.data.params["best_lr"] == "0.01"
    rows = read_csv(tmp_path / "multirun" / "report" / "summary.csv")
    assert [(r["optimizer.lr"], r["status"]) for r in rows] == [("0.01", "FINISHED"), ("10", "DIVERGED")]

    # fashion-sweep-compare rebuilds the same table from the store alone
    out = tmp_path / "again"
    again = run_script("fashion-sweep-compare", "--tracking-uri", store_uri(tmp_path / "mlruns"), "--out", str(out),
                       cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (out / "summary.csv").read_text() == (tmp_path / "multirun" / "report" / "summary.csv").read_text()
    assert sorted(p.name for p in out.iterdir()) == REPORT


def test_crashing_job_fails_the_sweep_but_not_the_others(tmp_path: Path) -> None:
    # all 1,000 images held out for validation: the config is valid, the job crashes in model.fit (no batches)
    proc = fashion_sweep(tmp_path, "-m", "data.val_fraction=0.1,0.9995", *QUICK, "tracking.log_model=false")
    assert proc.returncode != 0
    (failed_job,) = [line for line in proc.stderr.splitlines() if line.startswith("Error executing job with overrides")]
    assert "'data.val_fraction=0.9995'" in failed_job
    assert "KeyError: 'loss'" in proc.stderr
    assert "Traceback" not in proc.stderr
    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FAILED"
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    rows = read_csv(tmp_path / "multirun" / "report" / "summary.csv")
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED"]
    assert "KeyError" in rows[1]["note"]
    assert "FAILED" in proc.stdout  # the table printed at the end says which job failed, and why


@pytest.mark.slow
def test_compare_errors_are_one_line(tmp_path: Path, lr_sweep) -> None:
    missing = run_script("fashion-sweep-compare", "--tracking-uri", store_uri(tmp_path / "none"), cwd=tmp_path)
    assert missing.returncode == 1 and "no MLflow store at" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "none").exists()
    store = store_uri(lr_sweep[0] / "mlruns")
    unknown = run_script("fashion-sweep-compare", "--tracking-uri", store, "--sweep", "nope", cwd=tmp_path)
    assert unknown.returncode == 1 and "no sweep 'nope' in the store" in unknown.stderr


@pytest.mark.parametrize(
    ("statuses", "completed", "expected"),
    [
        (["FINISHED", "DIVERGED"], True, "FINISHED"),
        (["FINISHED", "FAILED"], True, "FAILED"),
        (["FINISHED"], False, "FAILED"),
        (["FINISHED", "KILLED"], False, "KILLED"),
    ],
)
def test_sweep_status_follows_its_jobs(statuses: list[str], completed: bool, expected: str) -> None:
    assert sweep_status(statuses, completed) == expected


def test_sweep_stopped_between_two_jobs_is_killed_not_failed() -> None:
    assert sweep_status(["FINISHED"], completed=False, interrupted=True) == "KILLED"


def test_swept_keys_are_the_shared_params_that_differ() -> None:
    rmsprop = {LR: "0.001", "optimizer.name": "rmsprop", "optimizer.rho": "0.9", "trainer.epochs": "5"}
    adam = {LR: "0.01", "optimizer.name": "adam", "optimizer.beta_1": "0.9", "trainer.epochs": "5"}
    assert swept_keys([rmsprop, adam]) == [LR, "optimizer.name"]  # knobs only one optimizer has are not swept
    assert swept_keys([rmsprop, rmsprop]) == [LR]


def test_rank_puts_finished_runs_best_first_and_never_a_diverged_one_first() -> None:
    def row(lr: str, best: float, status: str) -> dict:
        return {LR: lr, "best_val_loss": best, "status": status, "run_id": lr}

    rows = [row("0.1", 0.01, "DIVERGED"), row("0.001", 0.3, "FINISHED"), row("0.01", 0.2, "FINISHED"),
            row("1e-05", float("nan"), "FAILED")]  # fmt: skip
    assert [r[LR] for r in rank(rows)] == ["0.01", "0.001", "1e-05", "0.1"]


def test_ctrl_c_mid_sweep_ends_job_and_parent_killed_with_a_report(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(BIN / "fashion-sweep"), "--multirun", f"tracking.uri={store_uri(tmp_path / 'mlruns')}",
         f"tracking.artifact_location={tmp_path / 'mlruns' / 'artifacts'}", f"hydra.sweep.dir={tmp_path}/multirun",
         "optimizer.lr=0.001,0.002", "data.train_size=5000", "trainer.epochs=50", "trainer.verbose=2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=interruptible,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first job's first epoch has ended: training is under way
            if "val_loss" in line:
                break
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in output
    parent, children = parent_and_children(tmp_path)
    assert [c.info.status for c in children] == ["KILLED"]  # the second job never started
    assert parent.info.status == "KILLED"
    assert [r["status"] for r in read_csv(tmp_path / "multirun" / "report" / "summary.csv")] == ["KILLED"]


def test_lr_series_groups_by_the_other_swept_values_and_marks_unfinished_runs() -> None:
    def row(lr: str, name: str, status: str, loss: float) -> dict:
        return {LR: lr, "optimizer.name": name, "status": status, "final_loss": loss, "final_val_loss": loss + 1}

    rows = [
        row("0.01", "adam", "FINISHED", 0.3),
        row("0.001", "adam", "FINISHED", 0.2),
        row("0.1", "sgd", "DIVERGED", 9),
    ]
    series = lr_series(rows, [LR, "optimizer.name"])
    assert series["optimizer.name=adam"] == ([0.001, 0.01], [0.2, 0.3], [1.2, 1.3])
    assert series["optimizer.name=sgd"] == ([0.1], [math.inf], [math.inf])


def test_each_epoch_logs_job_epoch_and_the_sweeps_time_left(lr_sweep) -> None:
    tmp, proc = lr_sweep
    lines = [line.split(" - ", 1)[1] for line in proc.stdout.splitlines() if "% done, ~" in line]
    assert [line.split(" · ")[:2] for line in lines] == [["job 1/3", "epoch 1/1"], ["job 2/3", "epoch 1/1"],
                                                         ["job 3/3", "epoch 1/1"]]  # fmt: skip
    shares = [line.split(" · ")[2] for line in lines]
    for share, percent in zip(shares, ("33", "66", "100"), strict=True):
        assert re.fullmatch(percent + r"% done, ~\d+ s left \(~\d\d:\d\d\)", share), share
    client = MlflowClient(store_uri(tmp / "mlruns"))
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.sweep_role='parent'")
    assert parent.data.tags["progress"].startswith("finished after ")
