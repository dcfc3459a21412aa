"""`fashion-sweep-ui` serves the MLflow UI on 127.0.0.1, and a real headless Chromium sees the sweep's runs in it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fashion_sweep import data
from tests.conftest import BIN, fashion_sweep, store_uri

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags as root in a closed network: without the background-networking ones Chromium keeps dialling out.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the UI exited early"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


@pytest.fixture
def ui(lr_sweep):
    """The UI on the sweep's store, on a free port of 127.0.0.1; stopped (with its workers) afterwards."""
    tmp, _ = lr_sweep
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "fashion-sweep-ui"), "--port", str(port), "--tracking-uri", store_uri(tmp / "mlruns")],
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}", tmp
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the UI's process group (server, workers, job consumers); SIGKILL what is left after 20 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        proc.poll()  # reap the server itself so that it stops counting as a member of the group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_ui_listens_on_loopback_only(ui) -> None:
    url, _ = ui
    port = int(url.rsplit(":", 1)[1])
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert out.strip() and all("127.0.0.1:" in line for line in out.strip().splitlines())


@pytest.mark.slow
def test_browser_sees_the_sweeps_runs(ui, tmp_path: Path) -> None:
    assert CHROMIUM, "Chromium is missing: apt-get install chromium (.ci/run and `make test` install it)"
    url, store = ui
    client = MlflowClient(store_uri(store / "mlruns"))
    experiment = client.get_experiment_by_name("fashion-sweep")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    page = f"{url}/#/experiments/{experiment.experiment_id}/runs"  # MLflow 3: the bare experiment URL has no runs
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path}", "--virtual-time-budget=30000", "--dump-dom", page],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert parent.info.run_name in dom  # the sweep's parent row; its 3 jobs are nested under it
    assert f"<strong>{len(runs)}</strong> matching runs" in dom  # parent + 3 jobs


@pytest.fixture(scope="module")
def model_sweep(tmp_path_factory: pytest.TempPathFactory):
    """A real 2-rate sweep that logs its models and samples system metrics every second; its best model is
    registered (as `mlp`, tracking.registered_model's default). Yields (tmp dir, output)."""
    tmp = tmp_path_factory.mktemp("models")
    proc = fashion_sweep(tmp, "--multirun", "optimizer.lr=0.001,0.003", "model=mlp", "data.train_size=2000",
                         "trainer.epochs=3", "trainer.verbose=0", "tracking.system_metrics_interval=1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return tmp, proc.stdout


@pytest.fixture(scope="module")
def model_ui(model_sweep):
    """fashion-sweep-ui on the model sweep's store; yields (the page it says to open, tmp dir)."""
    tmp, _ = model_sweep
    proc = subprocess.Popen(
        [str(BIN / "fashion-sweep-ui"), "--port", str(free_port()), "--tracking-uri", store_uri(tmp / "mlruns")],
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "MLflow UI: <page>  (store ...)"
        page = first.split()[2]
        wait_until_up(page.split("/#/")[0] + "/health", proc)
        yield page, tmp
    finally:
        stop_group(proc)


# Draw every frame and never throttle a hidden page's timers: the charts of MLflow's UI render lazily.
RENDER_FLAGS = ["--run-all-compositor-stages-before-draw", "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows"]  # fmt: skip


def rendered(page: str, profile: Path, until: str = "") -> str:
    """The DOM of page after the UI's scripts ran, in a fresh headless Chromium (tall, so that every chart renders).
    A run's charts render only once Chromium draws them: on a loaded machine the DOM was often dumped before (1 in 3
    with the flags above, 0 in 6 with RENDER_FLAGS, Chromium 2026-12-05). With `until`, up to three tries, until the
    DOM holds it."""
    assert CHROMIUM, "Chromium is missing: apt-get install chromium (.ci/run and `make test` install it)"
    for attempt in range(3):
        command = [CHROMIUM, *CHROMIUM_FLAGS, *RENDER_FLAGS, f"--user-data-dir={profile}-{attempt}",
                   "--window-size=1400,3000", "--virtual-time-budget=60000", "--dump-dom", page]  # fmt: skip
        dom = subprocess.run(command, capture_output=True, text=True, timeout=180).stdout
        if until in dom:
            break
    return dom


@pytest.mark.slow
def test_a_fresh_browser_lands_on_the_sweeps_answer_in_model_training_mode(model_ui, tmp_path: Path) -> None:
    page, store = model_ui
    client = MlflowClient(store_uri(store / "mlruns"))
    experiment = client.get_experiment_by_name("fashion-sweep")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([experiment.experiment_id], "tags.sweep_role = 'parent'")
    assert page.endswith(f"#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
                         "?workflowType=machine_learning")  # fmt: skip
    dom = rendered(page, tmp_path / "parent")
    assert "Model registry" in dom and "Token Usage" not in dom  # the model-training sidebar, not GenAI's
    assert parent.info.run_name in dom
    best = parent.data.params["best_lr"]
    assert f"Best: optimizer.lr={best}" in dom  # the description: the answer, then the table
    assert "<table" in dom and "best_val_loss" in dom and "FINISHED" in dom

    runs_page = page.split("/runs/")[0] + "/runs?workflowType=machine_learning"
    assert "matching runs" in rendered(runs_page, tmp_path / "runs")


@pytest.mark.slow
def test_a_runs_system_metrics_tab_shows_cpu_and_memory(model_ui, tmp_path: Path) -> None:
    page, store = model_ui
    client = MlflowClient(store_uri(store / "mlruns"))
    experiment_id = client.get_experiment_by_name("fashion-sweep").experiment_id
    child = [r for r in client.search_runs([experiment_id]) if r.data.tags.get("sweep_role") != "parent"][0]
    tab = page.split("/runs/")[0] + f"/runs/{child.info.run_id}/system-metrics?workflowType=machine_learning"
    dom = rendered(tab, tmp_path, until="system/cpu_utilization_percentage")
    assert "system/cpu_utilization_percentage" in dom and "system/system_memory_usage_megabytes" in dom


@pytest.mark.slow
def test_the_registered_version_links_back_to_its_run(model_ui, tmp_path: Path) -> None:
    page, store = model_ui
    client = MlflowClient(store_uri(store / "mlruns"))
    (version,) = client.search_model_versions("name = 'mlp'")
    experiment_id = client.get_experiment_by_name("fashion-sweep").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.sweep_role = 'parent'")
    best = client.get_run(version.run_id)
    assert best.data.params["optimizer.lr"] == parent.data.params["best_lr"] == version.tags["optimizer.lr"]
    assert version.tags["sweep_id"] == parent.info.run_id and parent.data.tags["registered_model_version"] == "mlp/1"
    dom = rendered(page.split("/#/")[0] + "/#/models/mlp/versions/1?workflowType=machine_learning", tmp_path)
    assert f'href="#/experiments/{experiment_id}/runs/{version.run_id}"' in dom  # "Source Run"


def test_the_registered_model_serves_raw_pixels_at_the_logged_accuracy(model_sweep, fashion_dir: Path) -> None:
    tmp, _ = model_sweep
    client = MlflowClient(store_uri(tmp / "mlruns"))
    (version,) = client.search_model_versions("name = 'mlp'")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(tmp / "mlruns"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    serve = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/mlp/1", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    proc = subprocess.Popen(serve, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, seconds=120)
        test = data.load(fashion_dir)
        predicted = []
        for start in range(0, len(test.y_test), 2500):  # every test image, as a user has it: uint8 28x28, 0-255
            body = json.dumps({"inputs": test.x_test[start : start + 2500, :, :, 0].tolist()}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                             {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=120) as response:
                predicted.append(np.argmax(json.loads(response.read())["predictions"], axis=1))
    finally:
        stop_group(proc)
    accuracy = float((np.concatenate(predicted) == test.y_test).mean())
    assert accuracy == client.get_run(version.run_id).data.metrics["test_accuracy"]
