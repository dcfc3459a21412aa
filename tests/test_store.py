"""The store on a first day: several sweeps creating it at once, a store left half-migrated, a database with
nothing behind it; real processes, a real SQLite store."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import BIN, QUICK, all_runs, fashion_sweep, store_uri

SMALL = ["model=mlp", *QUICK, "tracking.log_model=false"]


def sweep_command(tmp: Path, name: str) -> list[str]:
    return [str(BIN / "fashion-sweep"), "--multirun", "optimizer.lr=0.001,0.003", *SMALL,
            f"tracking.uri={store_uri(tmp / 'mlruns')}", f"tracking.artifact_location={tmp / 'mlruns' / 'artifacts'}",
            f"hydra.sweep.dir={tmp}/{name}"]  # fmt: skip


def test_four_sweeps_started_at_once_into_a_new_store_all_finish_grouped(tmp_path: Path) -> None:
    procs = [subprocess.Popen(sweep_command(tmp_path, f"sweep{i}"), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(4)]  # fmt: skip
    try:
        outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], outputs
    runs = all_runs(tmp_path)  # the store opens afterwards
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 4 and len({p.info.run_name for p in parents}) == 4  # names unique, even in one second
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(c.data.params["optimizer.lr"] for c in children) == ["0.001", "0.003"]
        assert {c.info.status for c in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert len(runs) == 12


def test_a_half_migrated_store_is_refused_in_one_line_with_how_to_recover(tmp_path: Path) -> None:
    (tmp_path / "mlruns").mkdir()
    MlflowClient(store_uri(tmp_path / "mlruns")).search_experiments()  # a real store, created by MLflow
    db = tmp_path / "mlruns" / "mlflow.db"
    with sqlite3.connect(db) as connection:  # what an interrupted migration leaves (seen when creations raced)
        connection.execute("CREATE TABLE _alembic_tmp_tags (key VARCHAR(250), value VARCHAR(5000))")
    proc = fashion_sweep(tmp_path, *SMALL)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "half-migrated (_alembic_tmp_tags)" in lines[0], proc.stderr
    assert f"delete {db}" in lines[0]  # it holds no runs yet


def test_a_database_uri_with_nothing_listening_is_refused_in_seconds(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = fashion_sweep(tmp_path, "tracking.uri=postgresql://mlflow@127.0.0.1:1/mlflow", *SMALL)
    assert time.monotonic() - started <= 10
    assert proc.returncode != 0
    assert "no database answers at 127.0.0.1:1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


OPEN_ONCE = """
import sys
from omegaconf import OmegaConf
from fashion_sweep import runs
runs.connect(OmegaConf.create({"uri": sys.argv[1], "experiment": "fashion-sweep", "artifact_location": sys.argv[2]}))
print("opened")
"""


def test_four_processes_opening_a_new_postgresql_store_at_once_all_succeed(tmp_path: Path) -> None:
    from benchmarks.server_load import postgres  # a scratch cluster on 127.0.0.1 (Debian's PostgreSQL)

    with postgres() as uri:
        command = [str(BIN / "python"), "-c", OPEN_ONCE, uri, str(tmp_path / "artifacts")]
        procs = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)
        ]
        try:
            outputs = [proc.communicate(timeout=300)[0] for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
        assert [proc.returncode for proc in procs] == [0, 0, 0, 0], outputs
        assert MlflowClient(uri).get_experiment_by_name("fashion-sweep") is not None  # the store opens afterwards
