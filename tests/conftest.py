"""Shared test helpers: the real console scripts in subprocesses, temporary MLflow stores, the real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fashion_sweep import data

BIN = Path(sys.executable).parent
# Small and fast: 1,000 real training images (900 train / 100 val), one epoch, no progress output.
QUICK = ["data.train_size=1000", "trainer.epochs=1", "trainer.verbose=0"]


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def run_script(name: str, *args: str, cwd: Path, timeout: float = 300, env: dict | None = None):
    """Run one of the package's console scripts; return the CompletedProcess (text output)."""
    return subprocess.run(
        [str(BIN / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def fashion_sweep(tmp: Path, *overrides: str, timeout: float = 300):
    """`fashion-sweep` with its store in tmp/mlruns and Hydra's output dirs under tmp."""
    return run_script(
        "fashion-sweep",
        f"tracking.uri={store_uri(tmp / 'mlruns')}",
        f"tracking.artifact_location={tmp / 'mlruns' / 'artifacts'}",
        f"hydra.run.dir={tmp}/outputs/run",
        f"hydra.sweep.dir={tmp}/multirun",
        *overrides,
        cwd=tmp,
        timeout=timeout,
    )


def all_runs(tmp: Path) -> list[Run]:
    client = MlflowClient(store_uri(tmp / "mlruns"))
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The real Fashion-MNIST files, from Debian's dataset-fashion-mnist (or wherever the loader finds them)."""
    return data.locate(None, "/usr/share/datasets/fashion-mnist", None, url=None)
