"""`fashion-sweep-server` and `tracking=server`: a real `mlflow server` on 127.0.0.1, restarted under a sweep."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, run_script
from tests.test_resume import EPOCH_METRICS
from tests.test_ui import free_port, stop_group, wait_until_up


def start_server(store: Path, port: int) -> subprocess.Popen:
    """fashion-sweep-server on store (SQLite + proxied artifacts), in its own process group, up and answering."""
    proc = subprocess.Popen(
        [str(BIN / "fashion-sweep-server"), "--port", str(port), "--workers", "1", "--backend-store-uri",
         f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")],
        cwd=store.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    wait_until_up(f"http://127.0.0.1:{port}/health", proc)
    return proc


def sweep_command(tmp: Path, url: str, *overrides: str) -> list[str]:
    return [str(BIN / "fashion-sweep"), "--multirun", "tracking=server", f"tracking.uri={url}",
            f"hydra.sweep.dir={tmp}/multirun", "trainer.verbose=2", "tracking.log_model=false", *overrides]  # fmt: skip


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("sqlite:////proc/no-such-folder/mlflow.db", "fashion-sweep-server: cannot open the store"),
        ("postgresql://nobody@127.0.0.1:9/mlflow", "fashion-sweep-server: cannot open the store"),
    ],
)
def test_server_refuses_a_store_it_cannot_open_in_one_line(tmp_path: Path, store: str, message: str) -> None:
    proc = run_script("fashion-sweep-server", "--backend-store-uri", store, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_sweep_through_the_server_loses_nothing_when_the_server_restarts(tmp_path: Path) -> None:
    store, port = tmp_path / "server", free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    command = sweep_command(tmp_path, url, "optimizer.lr=0.001", "data.train_size=2000", "trainer.epochs=3")
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        assert sweep.stdout is not None
        for line in sweep.stdout:
            if "epoch 1/3" in line:  # its first epoch is in the store; the rest must wait for the server
                break
        stop_group(server)
        time.sleep(10)  # the server is down for 10 s (tracking=server's retries wait up to ~65 s)
        server = start_server(store, port)
        output, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, output
    finally:
        if sweep.poll() is None:
            sweep.send_signal(signal.SIGKILL)
        stop_group(server)

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")  # the server's own store, read directly
    (experiment,) = [e for e in client.search_experiments() if e.name == "fashion-sweep-shared"]
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # the server's, not a worker's disk
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and len(children) == 1 and "best_lr" in parent.data.params
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in EPOCH_METRICS:
            assert sorted(m.step for m in client.get_metric_history(child.info.run_id, metric)) == [1, 2, 3]
    assert (store / "artifacts" / experiment.experiment_id / parent.info.run_id / "artifacts" / "summary.csv").is_file()


def test_an_experiment_with_local_artifacts_is_refused_through_the_server(tmp_path: Path) -> None:
    store, port = tmp_path / "server", free_port()
    store.mkdir()
    local = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    local.create_experiment("fashion-sweep", artifact_location=(tmp_path / "mlruns" / "artifacts").as_uri())
    server = start_server(store, port)
    try:
        overrides = [f"tracking.uri=http://127.0.0.1:{port}", "tracking.experiment=fashion-sweep"]
        proc = run_script("fashion-sweep", "tracking=server", *overrides, f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
    finally:
        stop_group(server)
    assert proc.returncode == 1
    assert "experiment 'fashion-sweep' keeps its artifacts in file://" in proc.stderr
    assert "pick a new tracking.experiment=NAME" in proc.stderr
    assert not local.search_runs([e.experiment_id for e in local.search_experiments()])
