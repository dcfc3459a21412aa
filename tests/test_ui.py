"""`fashion-sweep-ui` serves the MLflow UI on 127.0.0.1, and a real headless Chromium sees the sweep's runs in it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, store_uri

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
