"""Shared test helpers: the real console scripts in subprocesses, temporary MLflow stores, the real data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fashion_sweep import data

BIN = Path(sys.executable).parent
ROOT = Path(__file__).parents[1]
# Small and fast: 1,000 real training images (900 train / 100 val), one epoch, no progress output.
QUICK = ["data.train_size=1000", "trainer.epochs=1", "trainer.verbose=0"]
# The test files by their time in the suite, longest first (seconds, AMD EPYC, 2 cores, 2026-12-04): xdist hands
# each worker the next file in this order, so the long ones start first and the short ones fill the end. Files not
# named here follow, in pytest's order. (xdist's own order, by number of tests, started the long files last.)
LONGEST_FIRST = [
    "test_resume.py",  # 159 (+70 since 2026-12-05: damaged checkpoints)
    "test_benchmarks.py",  # 158
    "test_ui.py",  # 31 (+80 since 2026-12-05: the model sweep, Chromium, serving)
    "test_server.py",  # 95
    "test_run.py",  # 90
    "test_schedule_free.py",  # ~100 (2026-12-05)
    "test_halving.py",  # 89
    "test_ray.py",  # 72
    "test_structure.py",  # ~70 (2026-12-05)
    "test_sweep.py",  # 65
    "test_auth.py",  # ~110 (2026-12-05)
    "test_store.py",  # ~45 (2026-12-05)
    "test_compare.py",  # 30
    "test_lr_find.py",  # 26
    "test_old_store.py",  # ~25 (2026-12-05)
    "test_options.py",  # 16
    "test_models.py",  # 12
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest test files first (LONGEST_FIRST; with --no-loadscope-reorder xdist keeps this order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def interruptible() -> None:
    """preexec_fn for a child the test interrupts: SIGINT as a terminal delivers it. A shell starts background
    commands with SIGINT ignored, and the child would inherit that from a pytest run in the background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def fashion_sweep(tmp: Path, *overrides: str, timeout: float = 300, env: dict | None = None):
    """`fashion-sweep` with its store in tmp/mlruns and Hydra's output dirs under tmp (flags such as -m first);
    env: variables added to this environment."""
    flags = [arg for arg in overrides if arg.startswith("-")]
    return run_script(
        "fashion-sweep",
        *flags,
        f"tracking.uri={store_uri(tmp / 'mlruns')}",
        f"tracking.artifact_location={tmp / 'mlruns' / 'artifacts'}",
        f"hydra.run.dir={tmp}/outputs/run",
        f"hydra.sweep.dir={tmp}/multirun",
        *[arg for arg in overrides if arg not in flags],
        cwd=tmp,
        timeout=timeout,
        env=env,
    )


def all_runs(tmp: Path) -> list[Run]:
    client = MlflowClient(store_uri(tmp / "mlruns"))
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The real Fashion-MNIST files, from Debian's dataset-fashion-mnist (or wherever the loader finds them)."""
    return data.locate(None, "/usr/share/datasets/fashion-mnist", None, url=None)


@pytest.fixture(scope="session")
def lr_sweep(tmp_path_factory: pytest.TempPathFactory):
    """A real 3-learning-rate multirun into a fresh store; yields (tmp dir, finished process)."""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = fashion_sweep(tmp, "--multirun", "optimizer.lr=0.0003,0.001,0.003", *QUICK, "tracking.log_model=false")
    assert proc.returncode == 0, proc.stderr
    return tmp, proc
