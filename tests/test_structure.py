"""The layout's promises: what reads the store imports no TensorFlow, and a metric compiled into the model reaches
MLflow and the report with no second edit."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fashion_sweep import runs
from tests.conftest import BIN, QUICK, all_runs, store_uri

# Modules that read or check the store, plan sweeps or draw: none may import TensorFlow (docs/architecture.md).
TENSORFLOW_FREE = [
    "cli", "compare", "config", "data", "halving", "parent", "plots", "progress", "resume", "runs", "server",
    "store", "sweep", "ui", "hydra_internals", "mlflow_internals", "registry",
]  # fmt: skip

REPORT_TENSORFLOW = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('tensorflow' in sys.modules, file=sys.stderr))\n"
    "sys.argv = sys.argv[1:]\n"
    "from fashion_sweep.{module} import main\n"
    "main()\n"
)


def tensorflow_imported(module: str, *args: str, cwd: Path) -> tuple[bool, subprocess.CompletedProcess]:
    """Run fashion_sweep.<module>.main with args in a fresh Python; whether TensorFlow was imported by its exit."""
    code = REPORT_TENSORFLOW.format(module=module)
    proc = subprocess.run([str(BIN / "python"), "-c", code, module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    return proc.stderr.strip().splitlines()[-1] == "True", proc


def test_modules_that_read_the_store_import_no_tensorflow(tmp_path: Path) -> None:
    code = "import sys\n" + "".join(f"import fashion_sweep.{m}\n" for m in TENSORFLOW_FREE)
    code += "import hydra_plugins.fashion_sweep_halving.halving_sweeper\nprint('tensorflow' in sys.modules)\n"
    proc = subprocess.run([str(BIN / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["compare", "ui", "server", "resume"])
def test_console_scripts_answer_help_without_tensorflow(module: str, tmp_path: Path) -> None:
    imported, proc = tensorflow_imported(module, "--help", cwd=tmp_path)
    assert "usage:" in proc.stdout
    assert not imported


def test_compare_and_resume_read_a_real_store_without_tensorflow(lr_sweep) -> None:
    tmp, _ = lr_sweep
    uri = store_uri(tmp / "mlruns")
    imported, proc = tensorflow_imported("compare", "--tracking-uri", uri, "--out", str(tmp / "report"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "report" / "summary.csv").is_file()
    assert not imported
    imported, proc = tensorflow_imported("resume", "--tracking-uri", uri, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to resume" in proc.stdout
    assert not imported


# The developer's edit, made in the process: one more metric where train.py compiles the model.
WITH_TOP_K = (
    "import sys\n"
    "from fashion_sweep import train\n"
    "train.METRICS.append('sparse_top_k_categorical_accuracy')\n"
    "from fashion_sweep.cli import main\n"
    "sys.argv = ['fashion-sweep', *sys.argv[1:]]\n"
    "main()\n"
)


def test_a_metric_compiled_into_the_model_reaches_mlflow_and_the_report(tmp_path: Path) -> None:
    top_k = "sparse_top_k_categorical_accuracy"
    store = [f"tracking.uri={store_uri(tmp_path / 'mlruns')}", f"tracking.artifact_location={tmp_path / 'artifacts'}"]
    args = ["--multirun", "optimizer.lr=0.001,0.003", "model=mlp", *QUICK, "trainer.epochs=2",
            "tracking.log_model=false", *store, f"hydra.sweep.dir={tmp_path}/multirun"]  # fmt: skip
    proc = subprocess.run([str(BIN / "python"), "-c", WITH_TOP_K, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(store_uri(tmp_path / "mlruns"))
    children = [r for r in all_runs(tmp_path) if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 2 and sum("test_accuracy" in run.data.metrics for run in children) == 1  # the selected
    for run in children:
        per_epoch = {*runs.EPOCH_METRICS_BEFORE_TAG, top_k, f"val_{top_k}"}
        assert set(runs.epoch_metrics(run)) == per_epoch
        tested = {"test_loss", "test_accuracy", "test_seconds"} if "test_accuracy" in run.data.metrics else set()
        assert set(run.data.metrics) == per_epoch | {"fit_seconds"} | tested
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"val_{top_k}")] == [1, 2]

    with open(tmp_path / "multirun" / "report" / "summary.csv") as f:
        table = list(csv.DictReader(f))
    by_run = {run.info.run_id: run for run in children}
    for row in table:
        metrics = by_run[row["run_id"]].data.metrics
        assert float(row[f"final_{top_k}"]) == pytest.approx(metrics[top_k], rel=1e-5)
        assert float(row[f"final_val_{top_k}"]) == pytest.approx(metrics[f"val_{top_k}"], rel=1e-5)
