"""A sweep's report: seed replicates summarised per setting, pruned runs of a halving sweep shown apart."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fashion_sweep.compare import (
    COLUMNS,
    LR,
    SEED,
    Report,
    best_run_id,
    best_setting,
    halving_rungs,
    lowest,
    lr_series,
    lr_spread,
    pruned_points,
    rank,
    run_columns,
    selected_run_ids,
    settings,
    status_summary,
    summary,
    write_report,
)
from fashion_sweep.runs import find_parent
from tests.conftest import QUICK, all_runs, fashion_sweep, run_script, store_uri

NAN = math.nan


def run(lr: str, seed: str = "1", best: float = 0.5, status: str = "FINISHED", test: float = 0.8, **more) -> dict:
    row = {LR: lr, SEED: seed, "best_val_loss": best, "test_accuracy": test, "status": status,
           "run_id": f"{lr}-{seed}", "final_loss": best - 0.1, "final_val_loss": best, "epochs": 3}  # fmt: skip
    return {**row, **more}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_settings_group_the_seeds_with_mean_and_sample_std() -> None:
    rows = [run("0.001", s, best, test=acc) for s, best, acc in (("1", 0.3, 0.9), ("2", 0.5, 0.8), ("3", 0.4, 0.85))]
    rows += [run("0.01", s, best) for s, best in (("1", 0.6), ("2", 0.7))]
    table = settings(rows, [LR])
    assert [s[LR] for s in table] == ["0.001", "0.01"]
    first = table[0]
    assert (first["n"], first["n_finished"], first["status"]) == (3, 3, "FINISHED")
    assert first["best_val_loss_mean"] == pytest.approx(0.4)
    assert first["best_val_loss_std"] == pytest.approx(statistics.stdev([0.3, 0.5, 0.4]))  # ddof=1
    assert first["test_accuracy_mean"] == pytest.approx(0.85)
    assert first["test_accuracy_std"] == pytest.approx(0.05)
    assert set(first) == {LR, "n", "n_finished", "best_val_loss_mean", "best_val_loss_std", "test_accuracy_mean",
                          "test_accuracy_std", "status"}  # fmt: skip


def test_best_setting_is_the_lowest_mean_and_never_one_with_a_diverged_run() -> None:
    rows = [run("0.01", "1", 0.1), run("0.01", "2", 0.2), run("0.01", "3", NAN, "DIVERGED", NAN)]  # lowest mean
    rows += [run("0.001", "1", 0.4), run("0.001", "2", 0.5)]
    rows += [run("0.003", "1", 0.3), run("0.003", "2", 0.6)]  # mean 0.45: second
    table = settings(rows, [LR])
    assert [(s[LR], s["status"]) for s in table] == [("0.003", "FINISHED"), ("0.001", "FINISHED"),
                                                     ("0.01", "2 FINISHED, 1 DIVERGED")]  # fmt: skip
    assert table[2]["best_val_loss_mean"] == pytest.approx(0.15)  # over the finished runs only
    best = best_setting(table)
    assert best is not None and best[LR] == "0.003"
    assert best["best_val_loss"] == pytest.approx(0.45) and best["test_accuracy"] == pytest.approx(0.8)


def test_the_selected_runs_are_the_best_run_or_the_finished_replicates_of_the_best_setting() -> None:
    rows = rank([run("0.001", "1", 0.4), run("0.001", "2", 0.3), run("0.01", "1", 0.2), run("0.01", "2", 0.9)])
    table, columns, best, best_is = summary(rows, [LR, SEED], [])
    report = Report(rows, [LR, SEED], best, [], table, columns, best_is)
    assert best is not None and best[LR] == "0.001"  # mean 0.35 against 0.55
    assert sorted(selected_run_ids(report)) == ["0.001-1", "0.001-2"] and best_run_id(report) == "0.001-2"
    table, columns, best, best_is = summary(rows, [LR], [])  # one run per row: the best run alone
    report = Report(rows, [LR], best, [], table, columns, best_is)
    assert selected_run_ids(report) == ["0.01-1"] == [best_run_id(report)]
    assert selected_run_ids(Report([], [LR], None, [], [], [], "")) == []


def test_a_setting_with_fewer_than_two_finished_runs_has_no_std_and_none_finished_no_best() -> None:
    table = settings([run("0.1", "1", 0.9), run("0.1", "2", NAN, "FAILED"), run("1", "1", NAN, "DIVERGED")], [LR])
    assert [(s["n"], s["n_finished"]) for s in table] == [(2, 1), (1, 0)]
    assert table[0]["best_val_loss_mean"] == 0.9 and math.isnan(table[0]["best_val_loss_std"])
    assert math.isnan(table[1]["best_val_loss_mean"]) and table[1]["status"] == "1 DIVERGED"
    assert best_setting(table) is None


def test_settings_are_the_swept_keys_but_the_seed() -> None:
    rows = [run(lr, seed, optimizer=name) for lr in ("0.001", "0.01") for seed in "12" for name in ("adam", "sgd")]
    table, columns, best, best_is = summary(rank(rows), [LR, "optimizer", SEED], [])
    assert len(table) == 4 and {s["n"] for s in table} == {2}
    assert columns[:3] == [LR, "optimizer", "n"] and SEED not in columns
    assert best is not None and "among settings whose runs all finished" in best_is


def test_single_seed_summary_is_the_runs_table_as_before() -> None:
    rows = rank([run("0.01", best=0.3), run("0.001", best=0.2), run("1", best=NAN, status="DIVERGED")])
    table, columns, best, best_is = summary(rows, [LR], [])
    assert table is rows and columns == [LR, *COLUMNS]
    assert best is rows[0] and best[LR] == "0.001"
    assert best_is.startswith("best = lowest validation loss reached in any epoch")


def test_status_summary_counts_each_status_finished_first() -> None:
    assert status_summary(["FINISHED", "FINISHED"]) == "FINISHED"
    assert status_summary(["DIVERGED", "FINISHED", "PRUNED", "FINISHED"]) == "2 FINISHED, 1 DIVERGED, 1 PRUNED"


def test_rank_puts_pruned_runs_after_finished_ones_later_rung_first() -> None:
    rows = [
        run("0.1", best=0.05, status="DIVERGED"),
        run("0.03", best=0.4, status="PRUNED", epochs=1),
        run("0.02", best=0.6, status="PRUNED", epochs=3),
        run("0.01", best=0.5, status="PRUNED", epochs=3),
        run("0.003", best=0.35, epochs=10),
        run("0.001", best=0.3, epochs=10),
        run("0.0001", best=NAN, status="KILLED", epochs=0),
    ]
    assert [r[LR] for r in rank(rows)] == ["0.001", "0.003", "0.01", "0.02", "0.03", "0.0001", "0.1"]


def test_a_pruned_run_is_never_best() -> None:
    rows = rank([run("0.01", best=0.1, status="PRUNED", epochs=1), run("0.1", best=NAN, status="DIVERGED")])
    assert summary(rows, [LR], [1, 3, 10])[2] is None


def test_val_loss_at_a_rung_is_the_lowest_up_to_it_and_blank_before() -> None:
    val_loss = [0.9, 0.7, 0.8, NAN]
    assert [lowest(val_loss, k) for k in (1, 3, 4, 10)] == [0.9, 0.7, 0.7, ""]
    assert math.isnan(lowest([NAN], 1))
    assert run_columns([LR], [1, 3, 10])[:6] == [LR, "best_val_loss", "best_epoch", "val_loss@1", "val_loss@3",
                                                 "val_loss@10"]  # fmt: skip
    assert run_columns([LR], []) == [LR, *COLUMNS]


def test_halving_rungs_come_from_the_parent_tag_and_old_sweeps_have_none() -> None:
    assert halving_rungs({"halving_rungs": "1,3,10"}) == [1, 3, 10]
    assert halving_rungs({"sweep_role": "parent"}) == []


def test_lr_plot_data_averages_the_seeds_and_draws_pruned_runs_apart() -> None:
    rows = [run("0.001", "1", 0.3), run("0.001", "2", 0.5), run("0.01", "1", NAN, "DIVERGED"),
            run("0.01", "2", 0.9, "PRUNED", epochs=1)]  # fmt: skip
    lrs, train, val = lr_series(rows, [LR])[""]
    assert lrs == [0.001, 0.01] and val[0] == pytest.approx(0.4) and train[1] == val[1] == math.inf
    assert lr_spread(rows, [LR])[""][1][0] == pytest.approx(statistics.stdev([0.3, 0.5]))
    assert pruned_points(rows, [LR]) == {"": [(0.01, pytest.approx(0.8), 0.9, 1)]}


def fake_run(client: MlflowClient, experiment: str, parent: str, lr: str, seed: str, val_loss: list[float],
             status: str = "FINISHED", **tags: str) -> None:  # fmt: skip
    """A child run as the halving sweeper leaves it: params, per-epoch metrics, tags, status."""
    run_id = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "sweep_id": parent, **tags}).info.run_id
    client.log_param(run_id, LR, lr)
    client.log_param(run_id, SEED, seed)
    for epoch, value in enumerate(val_loss, start=1):
        for metric in ("loss", "val_loss", "val_accuracy"):
            client.log_metric(run_id, metric, value if metric != "val_accuracy" else 1 - value / 3, step=epoch)
    if status == "FINISHED" and "pruned" not in tags:
        client.log_metric(run_id, "test_accuracy", 0.9 - val_loss[-1] / 10)
    client.set_terminated(run_id, status)


@pytest.fixture(scope="module")
def halving_store(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    """A store with two halving sweeps as the halving sweeper records them (rungs 1, 3, 5): "halving", one seed
    per lr, and "halving seeds", two seeds per lr."""
    client = MlflowClient(store_uri(tmp_path_factory.mktemp("halving")))
    experiment = client.create_experiment("fashion-sweep")
    for name, seeds in (("halving", ["1"]), ("halving seeds", ["1", "2"])):
        parent = client.create_run(experiment, run_name=name, tags={"sweep_role": "parent", "halving_rungs": "1,3,5"})
        parent_id = parent.info.run_id
        client.set_tag(parent_id, "sweep_id", parent_id)
        for seed in seeds:
            fake_run(client, experiment, parent_id, "0.001", seed, [0.9, 0.7, 0.6, 0.5, 0.55])
            fake_run(client, experiment, parent_id, "0.003", seed, [0.8, 0.6, 0.4, 0.45, 0.44])
            fake_run(client, experiment, parent_id, "0.01", seed, [0.7, 0.65, 0.66], pruned="true", pruned_at_epoch="3")
            fake_run(client, experiment, parent_id, "0.0003", seed, [1.2], pruned="true", pruned_at_epoch="1")
            fake_run(client, experiment, parent_id, "1", seed, [9.0], "FAILED", diverged="true", pruned="true",
                     pruned_at_epoch="1")  # fmt: skip
        client.set_terminated(parent_id, "FINISHED")
    return client


def test_halving_report_compares_runs_at_each_rung_and_shows_pruned_ones(halving_store, tmp_path: Path) -> None:
    report = write_report(halving_store, find_parent(halving_store, "halving"), tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert [(r[LR], r["status"]) for r in rows] == [("0.003", "FINISHED"), ("0.001", "FINISHED"), ("0.01", "PRUNED"),
                                                    ("0.0003", "PRUNED"), ("1", "DIVERGED")]  # fmt: skip
    assert [[r[f"val_loss@{k}"] for k in (1, 3, 5)] for r in rows] == [
        ["0.8", "0.4", "0.4"], ["0.9", "0.6", "0.5"], ["0.7", "0.65", ""], ["1.2", "", ""], ["9", "", ""]]  # fmt: skip
    assert rows[2]["note"] == "pruned at epoch 3" and rows[2]["epochs"] == "3"
    assert report.best is not None and report.best[LR] == "0.003" and report.best["best_val_loss"] == 0.4
    assert "by a run that reached the last rung" in (tmp_path / "summary.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_effect.png", "summary.csv", "summary.md",
                                                          "val_curves.png"]  # fmt: skip


def test_halving_with_seeds_reports_settings_and_runs(halving_store, tmp_path: Path) -> None:
    report = write_report(halving_store, find_parent(halving_store, "halving seeds"), tmp_path)
    settings_rows = read_csv(tmp_path / "summary.csv")
    assert [(s[LR], s["n"], s["status"]) for s in settings_rows][:3] == [
        ("0.003", "2", "FINISHED"), ("0.001", "2", "FINISHED"), ("0.0003", "2", "2 PRUNED")]  # fmt: skip
    assert report.best is not None and report.best[LR] == "0.003"
    runs = read_csv(tmp_path / "runs.csv")
    assert len(runs) == 10 and "val_loss@3" in runs[0]
    assert {p.name for p in report.files} == {"lr_effect.png", "val_curves.png", "summary.csv", "summary.md",
                                              "runs.csv", "runs.md"}  # fmt: skip


def test_seed_replicates_sweep_reports_mean_and_std_per_lr(tmp_path: Path) -> None:
    proc = fashion_sweep(tmp_path, "--multirun", "optimizer.lr=0.001,0.003", "trainer.seed=1,2,3", *QUICK,
                         "tracking.log_model=false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "multirun" / "report"
    settings_rows = read_csv(report / "summary.csv")
    assert sorted(s[LR] for s in settings_rows) == ["0.001", "0.003"]
    for setting in settings_rows:
        assert (setting["n"], setting["n_finished"], setting["status"]) == ("3", "3", "FINISHED")
        assert all(math.isfinite(float(setting[c])) for c in ("best_val_loss_mean", "best_val_loss_std"))
    selected, other = settings_rows  # the test set: each replicate of the selected setting, the others none
    assert all(math.isfinite(float(selected[c])) for c in ("test_accuracy_mean", "test_accuracy_std"))
    assert all(math.isnan(float(other[c])) for c in ("test_accuracy_mean", "test_accuracy_std"))
    scored = [r for r in all_runs(tmp_path) if "test_accuracy" in r.data.metrics and "trainer.seed" in r.data.params]
    assert sorted(r.data.params["trainer.seed"] for r in scored) == ["1", "2", "3"]
    assert {r.data.params[LR] for r in scored} == {selected[LR]}
    assert len(read_csv(report / "runs.csv")) == 6
    (parent,) = [r for r in all_runs(tmp_path) if r.data.tags.get("sweep_role") == "parent"]
    assert parent.data.params["best_lr"] == settings_rows[0][LR]
    mean = float(settings_rows[0]["best_val_loss_mean"])  # written with 6 significant digits
    assert parent.data.metrics["best_val_loss"] == pytest.approx(mean, rel=1e-5)
    client = MlflowClient(store_uri(tmp_path / "mlruns"))
    assert {"runs.csv", "runs.md", "summary.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "| optimizer.lr | n | n_finished | best_val_loss_mean |" in proc.stdout
    mean = statistics.mean(r.data.metrics["test_accuracy"] for r in scored)
    assert parent.data.metrics["test_accuracy"] == pytest.approx(mean) == float(selected["test_accuracy_mean"])


def test_a_sweep_name_several_sweeps_share_is_answered_with_the_matches(tmp_path: Path) -> None:
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(store_uri(tmp_path / "mlruns"))  # as a store from before parent names were made unique
    experiment = client.create_experiment("fashion-sweep", artifact_location=str(tmp_path / "artifacts"))
    ids = [client.create_run(experiment, run_name="lr_sweep 2026-12-01 10:00:00", tags={"sweep_role": "parent"})
           .info.run_id for _ in range(2)]  # fmt: skip
    proc = run_script("fashion-sweep-compare", "--sweep", "lr_sweep 2026-12-01 10:00:00", "--tracking-uri",
                      store_uri(tmp_path / "mlruns"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "2 sweeps are named 'lr_sweep 2026-12-01 10:00:00'" in line and all(i in line for i in ids)
    assert not (tmp_path / "reports").exists()
