"""tracking.py against a real MLflow store: what the jobs of a parallel sweep write at the same moment."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fashion_sweep import data, tracking
from tests.conftest import store_uri


def at_once(run_ids: list[str], work: Callable[[], None]) -> list[Exception]:
    """Run work inside each run, in a thread per run, all released together; return what they raised."""
    start, errors = threading.Barrier(len(run_ids)), []

    def job(run_id: str) -> None:
        with mlflow.start_run(run_id=run_id):
            start.wait()
            try:
                work()
            except Exception as err:  # collected: an exception in a thread would not fail the test
                errors.append(err)

    threads = [threading.Thread(target=job, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_parallel_jobs_logging_the_same_new_datasets_at_once_all_link_them(tmp_path: Path, fashion_dir: Path) -> None:
    # mlflow 3.17 looks a dataset up, then inserts it: without the retry 16 of 60 such calls failed here (6 threads)
    split = data.load_split(fashion_dir, 0.1, 200, 42)[0]
    data_cfg = OmegaConf.create({"val_fraction": 0.1, "train_size": 200})
    client = MlflowClient(store_uri(tmp_path))
    mlflow.set_tracking_uri(store_uri(tmp_path))
    experiment = client.create_experiment("parallel", artifact_location=str(tmp_path / "artifacts"))
    for seed in range(5):  # each seed's datasets are new to the store (another digest)
        runs = [client.create_run(experiment).info.run_id for _ in range(6)]
        errors = at_once(runs, lambda seed=seed: tracking.log_datasets(split, fashion_dir, data.SHA256, data_cfg, seed))
        assert errors == []
        digests = [{i.dataset.digest for i in client.get_run(r).inputs.dataset_inputs} for r in runs]
        assert all(len(d) == 3 for d in digests) and all(d == digests[0] for d in digests)  # one row each, shared
