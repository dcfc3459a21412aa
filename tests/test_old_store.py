"""A store written by the release before the restructure (c75a6e3) is still read, compared and resumed.

tests/fixtures/store-c75a6e3 is a real store of that release (made by tests/fixtures/make_old_store.py): a finished
2-rate sweep with its report, and a 4-epoch run stopped by Ctrl-C after epoch 2 (KILLED). Its absolute paths start
with /tmp/old-store; each test works on a copy with those paths moved to the copy's folder.
"""

from __future__ import annotations

import csv
import shutil
import sqlite3
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import run_script, store_uri

COMMIT = "c75a6e3"
FIXTURE = Path(__file__).parent / "fixtures" / f"store-{COMMIT}"
OLD_ROOT = "/tmp/old-store"  # where make_old_store.py wrote the store
EPOCH_METRICS = ["loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds"]


def relocate(db_file: Path, old: str, new: str) -> int:
    """Replace the old root by the new one in every text column of the database: the experiments' artifact
    locations, the runs' artifact URIs, and the params and tags that name the store (tracking.uri, the `launch`
    record that fashion-sweep-resume relaunches, job_overrides, hydra_output_dir). Returns the cells changed."""
    changed = 0
    with sqlite3.connect(db_file) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]:
                changed += db.execute(
                    f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                    (old, new, old),
                ).rowcount
        assert not any(old in line for line in db.iterdump())
    db.close()
    return changed


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    """A copy of the c75a6e3 store in tmp_path/store, its absolute paths pointing at the copy."""
    store = tmp_path / "store"
    shutil.copytree(FIXTURE, store)
    assert relocate(store / "mlflow.db", OLD_ROOT, str(store)) > 0
    return store


def runs_of(store: Path) -> list[Run]:
    client = MlflowClient(store_uri(store))
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def history(store: Path, run_id: str, metric: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(store_uri(store)).get_metric_history(run_id, metric))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("by", ["id", "name"])
def test_compare_reports_the_old_sweep_from_its_runs(old_store: Path, tmp_path: Path, by: str) -> None:
    (parent,) = [r for r in runs_of(old_store) if r.data.tags.get("sweep_role") == "parent"]
    jobs = [r for r in runs_of(old_store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(jobs) == 2 and all(j.data.tags["git_commit"].startswith(COMMIT) for j in jobs)  # the old release's
    sweep = parent.info.run_id if by == "id" else parent.info.run_name
    out = tmp_path / "report"
    proc = run_script("fashion-sweep-compare", "--tracking-uri", store_uri(old_store), "--sweep", sweep, "--out",
                      str(out), cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"Report of '{parent.info.run_name}' ({parent.info.run_id}) written to {out}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["lr_effect.png", "summary.csv", "summary.md", "val_curves.png"]
    rows = read_csv(out / "summary.csv")
    assert sorted(r["optimizer.lr"] for r in rows) == ["0.001", "0.01"]  # each rate once
    for job in jobs:
        (row,) = [r for r in rows if r["run_id"] == job.info.run_id]
        assert row["optimizer.lr"] == job.data.params["optimizer.lr"] and row["status"] == "FINISHED"
        lowest = min(value for _, value in history(old_store, job.info.run_id, "val_loss"))
        assert float(row["best_val_loss"]) == pytest.approx(lowest, rel=1e-5)  # written with 6 significant digits
        assert f"| {row['optimizer.lr']} | {row['best_val_loss']} |" in proc.stdout
    assert "| optimizer.lr | best_val_loss |" in (out / "summary.md").read_text()


def test_resume_continues_the_old_killed_run_in_place(old_store: Path, tmp_path: Path) -> None:
    before = runs_of(old_store)
    (killed,) = [r for r in before if r.info.status == "KILLED"]
    run_id = killed.info.run_id
    assert killed.data.tags["checkpoint_epoch"] == "2" and killed.data.tags["git_commit"].startswith(COMMIT)
    first_epochs = {m: history(old_store, run_id, m) for m in EPOCH_METRICS}
    assert all([step for step, _ in steps] == [1, 2] for steps in first_epochs.values())

    proc = run_script("fashion-sweep-resume", run_id, "--tracking-uri", store_uri(old_store), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"continuing run '{killed.info.run_name}' ({run_id})" in proc.stdout
    after = runs_of(old_store)
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in before)  # no new run
    (run,) = [r for r in after if r.info.run_id == run_id]
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    for metric in EPOCH_METRICS:  # every epoch logged exactly once; epochs 1-2 as the old release logged them
        logged = history(old_store, run_id, metric)
        assert [step for step, _ in logged] == [1, 2, 3, 4], metric
        assert logged[:2] == first_epochs[metric], metric
    assert not [r.info.run_id for r in after if r.info.status == "RUNNING"]


def test_resume_finds_nothing_to_do_in_the_old_finished_sweep(old_store: Path, tmp_path: Path) -> None:
    (parent,) = [r for r in runs_of(old_store) if r.data.tags.get("sweep_role") == "parent"]
    proc = run_script("fashion-sweep-resume", parent.info.run_id, "--tracking-uri", store_uri(old_store),
                      cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"nothing to resume: sweep '{parent.info.run_name}' ({parent.info.run_id}) is FINISHED" in proc.stdout
    assert not [r for r in runs_of(old_store) if r.info.status == "RUNNING"]
