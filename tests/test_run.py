"""One run end to end: the real `fashion-sweep` console script, real data, a real (temporary) MLflow store."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fashion_sweep import backend, data
from tests.conftest import BIN, QUICK, ROOT, all_runs, fashion_sweep, interruptible, store_uri

EPOCH_METRICS = ["loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds"]
ARTIFACTS = ["checkpoint", "config.yaml", "overrides.yaml", "curves.png", "confusion_matrix.png", "misclassified.png"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory):
    """One 2-epoch run on 2,000 images, recorded in a fresh store; yields (tmp dir, process, MLflow run)."""
    tmp = tmp_path_factory.mktemp("run")
    proc = fashion_sweep(tmp, "data.train_size=2000", "trainer.epochs=2", "trainer.verbose=0", "optimizer.lr=0.002")
    assert proc.returncode == 0, proc.stderr
    (run,) = all_runs(tmp)
    return tmp, proc, run


def test_run_is_finished_and_named_for_what_it_is(finished_run) -> None:
    tmp, _, run = finished_run
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.note.content"].startswith("Finished: best val_loss ")  # its page's description
    assert MlflowClient(store_uri(tmp / "mlruns")).search_registered_models() == []  # a single run registers none
    assert run.info.run_name == "seed_cnn rmsprop lr=0.002"


@pytest.mark.skipif(backend.has_nvidia_gpu(), reason="CUDA's start-up lines are kept where a GPU is present")
def test_terminal_shows_no_tensorflow_start_up_noise_on_a_cpu_machine(finished_run) -> None:
    _, proc, _ = finished_run
    output = proc.stdout + proc.stderr
    for noise in ("cuInit", "cudart", "cuda drivers", "oneDNN", "absl::InitializeLog"):
        assert noise not in output
    assert "Epoch" not in output and "test accuracy" in output  # verbose=0, and the run's own log line is kept


def test_tensorflow_is_imported_without_scikit_learn_which_still_imports_afterwards() -> None:
    code = (
        "import sys; from fashion_sweep import backend; backend.import_tensorflow(); "
        "fixes = sys.modules.get('keras.src.wrappers.fixes'); "
        "print('sklearn' in sys.modules, fixes is not None and fixes.sklearn is None); "
        "import sklearn; print(sklearn.__name__)"
    )
    proc = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # Keras 3.15's import tried scikit-learn and went without it; once Keras stops importing it (the second
    # value turns False), backend.sklearn_hidden can go.
    assert proc.stdout.split() == ["False", "True", "sklearn"]


def test_run_logs_the_whole_resolved_config_as_dotted_params(finished_run) -> None:
    tmp, _, run = finished_run
    params = run.data.params
    assert params["optimizer.lr"] == "0.002" and params["model.name"] == "seed_cnn"
    assert params["model.filters"] == "[32, 64]" and params["trainer.epochs"] == "2"
    assert params["tracking.uri"] == store_uri(tmp / "mlruns")  # resolved, not "${hydra:...}"
    assert not any("${" in value for value in params.values())


def test_run_logs_each_epoch_metric_once_per_epoch_and_test_metrics(finished_run) -> None:
    tmp, _, run = finished_run
    client = MlflowClient(store_uri(tmp / "mlruns"))
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(p.step for p in history) == [1, 2], name
    assert 0.5 < run.data.metrics["test_accuracy"] <= 1.0  # 2 epochs on 1,800 images beat chance (0.1) clearly
    assert run.data.metrics["test_loss"] > 0
    assert run.data.metrics["lr"] == pytest.approx(0.002)


def test_run_logs_its_data_sizes_and_time_inside_fit(finished_run) -> None:
    tmp, _, run = finished_run
    params, metrics = run.data.params, run.data.metrics
    assert (params["n_train"], params["n_val"], params["n_test"]) == ("1800", "200", "10000")
    epoch_seconds = MlflowClient(store_uri(tmp / "mlruns")).get_metric_history(run.info.run_id, "epoch_seconds")
    run_seconds = (run.info.end_time - run.info.start_time) / 1000
    assert sum(m.value for m in epoch_seconds) <= metrics["fit_seconds"] < run_seconds
    assert 0 < metrics["test_seconds"] < run_seconds


def test_run_logs_artifacts_tags_and_model(finished_run) -> None:
    tmp, _, run = finished_run
    client = MlflowClient(store_uri(tmp / "mlruns"))
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == sorted(ARTIFACTS)
    config_yaml = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    assert "lr: 0.002" in config_yaml
    overrides = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/overrides.yaml")
    assert "- optimizer.lr=0.002" in overrides
    tags = run.data.tags
    source = Path(tags["data_dir"])
    for name in data.SHA256:
        assert tags[f"data_sha256.{name}"] == data.sha256(source / name)
    assert Path(tags["hydra_output_dir"]) == tmp / "outputs" / "run"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags.get("git_commit") == (head or None)
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id  # shown in the run's models tab
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [model.model_id]


def test_logged_model_loads_and_predicts_probabilities(finished_run, fashion_dir: Path) -> None:
    tmp, _, run = finished_run
    (model,) = MlflowClient(store_uri(tmp / "mlruns")).search_logged_models([run.info.experiment_id])
    loaded = mlflow.pyfunc.load_model(model.artifact_location)
    images = data.load(fashion_dir).x_test[:5, :, :, 0]  # what a user has: uint8, 28x28, 0-255
    probabilities = np.asarray(loaded.predict(images))
    assert probabilities.shape == (5, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_logged_test_scores_are_what_keras_predict_makes_of_the_logged_model(finished_run, fashion_dir) -> None:
    tmp, _, run = finished_run  # the run scores the test set in batches (train.predict)
    (logged,) = MlflowClient(store_uri(tmp / "mlruns")).search_logged_models([run.info.experiment_id])
    model = mlflow.keras.load_model(logged.artifact_location)
    test = data.load(fashion_dir)
    probabilities = model.predict(test.x_test[..., 0], batch_size=1024, verbose=0)  # raw pixels, scaled inside
    accuracy = float((probabilities.argmax(axis=1) == test.y_test).mean())
    loss = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(test.y_test, probabilities)))
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"], abs=2e-4)  # at most 2 of 10,000 flip
    signature = mlflow.pyfunc.load_model(logged.artifact_location).metadata.signature.inputs.to_dict()
    assert signature == [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": (-1, 28, 28)}}]
    assert loss == pytest.approx(run.data.metrics["test_loss"], rel=1e-3)


# Each refusal once through the real console script; tests/test_config.py covers every rule in-process.
BAD_INPUT = [
    ("model=resnet", "model=resnet is not an option of model (its options: cnn_bn, mlp, readme_cnn, seed_cnn)"),
    ("model=cnn_nb", "model=cnn_nb is not an option of model (its options: cnn_bn, mlp, readme_cnn, seed_cnn); did"),
    ("trainer.epoch=3", "trainer.epoch is not a key of trainer=default (its keys: epochs, "),
    ("lr_find.min_lr=1", "lr_find.min_lr is not a key of lr_find=range_test (its keys: start_lr, end_lr, "),
    ("+trainer.epoch=3", "trainer.epoch is not a key of trainer=default (its keys: epochs, "),
    ("+model.extra=3", "model.extra is not a key of model=seed_cnn"),
    ("optimizer.lr=inf", "optimizer.lr=inf is not allowed: numbers must be finite"),
    ("model.dense_dropout=1.5", "model.dense_dropout=1.5 is not allowed: expected a rate in [0, 1)"),
    ("data.dir={tmp}/nowhere", "nowhere is not a directory; install it with `apt-get install dataset-fashion-mnist`"),
    ("data.dir={tmp}", "train-images-idx3-ubyte.gz is missing"),
    ("tracking.uri=http://127.0.0.1:9", "tracking.uri=http://127.0.0.1:9: no MLflow server answers there"),
    ("tracking.uri=mlruns", "tracking.uri=mlruns is not a store MLflow >= 3.13 can use"),
    ("tracking.uri=sqlite:///{tmp}/a_file/mlflow.db", "cannot write to"),
    ("tracking.experiment=" + "x" * 600, "is not allowed: expected an experiment name of 1 to 256 characters"),
    ("sweep_name=" + "y" * 300, "is not allowed: expected a name of 1 to 200 characters"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUT, ids=[o[:40] for o, _ in BAD_INPUT])
def test_bad_input_is_refused_in_one_line_before_any_run(tmp_path: Path, override: str, message: str) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    started = time.monotonic()
    proc = fashion_sweep(tmp_path, *QUICK, override.format(tmp=tmp_path), timeout=120)
    assert time.monotonic() - started < 30
    assert proc.returncode != 0
    assert proc.stderr.startswith("fashion-sweep: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no Hydra frame, no option list
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or all_runs(tmp_path) == []


# Prints, last thing at exit, whether TensorFlow was ever imported; then runs the console script's main().
WITH_TF_REPORT = (
    "import atexit, sys; atexit.register(lambda: print('tensorflow imported:', 'tensorflow' in sys.modules, "
    "file=sys.stderr)); from fashion_sweep.cli import main; main()"
)


# What is refused without TensorFlow: a key's typo, a folder without the data, a store that cannot be.
REFUSED_WITHOUT_TF = [
    ("+trainer.epoch=3", "trainer.epoch is not a key of trainer=default"),
    ("data.dir={tmp}", "train-images-idx3-ubyte.gz is missing"),
    ("tracking.uri=mlruns", "tracking.uri=mlruns is not a store MLflow >= 3.13 can use"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED_WITHOUT_TF, ids=["typo", "data", "store"])
@pytest.mark.parametrize("sweep", [[], ["--multirun", "optimizer.lr=0.001,0.002"]], ids=["run", "multirun"])
def test_what_needs_no_tensorflow_is_refused_before_it_is_imported(
    tmp_path: Path, sweep: list[str], override: str, message: str
) -> None:
    where = [f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/multirun"]
    store = [] if override.startswith("tracking.uri") else [f"tracking.uri={store_uri(tmp_path / 'mlruns')}"]
    args = [*sweep, *store, *where, override.format(tmp=tmp_path)]
    proc = subprocess.run(
        [str(BIN / "python"), "-c", WITH_TF_REPORT, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "tensorflow imported: False" in proc.stderr


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("optimizer.lr=0.001,-1", "job ['optimizer.lr=-1'] refused, nothing was run: optimizer.lr=-1 is not allowed"),
        ("model=seed_cnn,resnet", "job ['model=resnet'] refused, nothing was run: model=resnet is not an option"),
        ("optimizer.lr=0.001,inf", "job ['optimizer.lr=inf'] refused, nothing was run: optimizer.lr=inf is not"),
        ("tracking.uri=http://127.0.0.1:9,sqlite:///x.db", "no MLflow server answers there"),
    ],
)
def test_bad_job_in_a_multirun_is_refused_before_any_job_runs(tmp_path: Path, sweep: str, message: str) -> None:
    proc = fashion_sweep(tmp_path, "--multirun", sweep, *QUICK, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or all_runs(tmp_path) == []


def test_bad_input_under_joblib_is_refused_before_any_worker_runs(tmp_path: Path) -> None:
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = fashion_sweep(tmp_path, "--multirun", *joblib, "optimizer.lr=0.001,0.002", "+model.extra=3", *QUICK)
    assert proc.returncode != 0 and "model.extra is not a key of model=seed_cnn" in proc.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or all_runs(tmp_path) == []


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_a_signal_mid_training_ends_the_run_killed_with_the_shells_exit_code(
    tmp_path: Path, signum: int, code: int
) -> None:
    proc = subprocess.Popen(
        [str(BIN / "fashion-sweep"), f"tracking.uri={store_uri(tmp_path / 'mlruns')}",
         f"tracking.artifact_location={tmp_path / 'mlruns' / 'artifacts'}", f"hydra.run.dir={tmp_path}/out",
         "data.train_size=5000", "trainer.epochs=50", "trainer.verbose=2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=interruptible,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the first epoch has ended: training is under way
            if "val_loss" in line:
                break
        time.sleep(1)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code
    (run,) = all_runs(tmp_path)
    assert run.info.status == "KILLED"
    assert f"interrupted; run {run.info.run_id} is marked KILLED" in output and "Traceback" not in output
