"""What MLflow's system-metrics sampler and the model registration cost a run.

The sampler (tracking.system_metrics) works in a thread of the training process: every interval it collects CPU,
memory, disk and network figures (psutil), reads the run and logs them. This times that work, sample and log, in
a scratch SQLite store, repeats times, and states it as a share of the interval, which is the share of the
training process's time it takes (an upper bound: the thread sleeps between samples). It also times registering a
logged model as a new version (what a sweep does once, at its end). Prints one JSON line:
`.venv/bin/python -m benchmarks.system_metrics` (about 30 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fashion_sweep import backend

backend.import_tensorflow()
import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from fashion_sweep import registry, tracking  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="samples to time")
    parser.add_argument("--interval", type=float, default=10.0, help="tracking.system_metrics_interval, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("cost", artifact_location=Path(folder, "a").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            monitor = SystemMetricsMonitor(run.info.run_id, tracking_uri=uri)
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()  # one turn of SystemMetricsMonitor.monitor (mlflow 3.17), logged at once
                monitor.collect_metrics()
                MlflowClient(uri).get_run(run.info.run_id)  # it checks that the run still runs
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
                seconds.append(time.perf_counter() - started)
            model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
            images = np.zeros((2, 28, 28), np.uint8)
            tracking.log_model(model, images, model.predict_on_batch(images[..., None] / 255))
        started = time.perf_counter()
        registry.register(MlflowClient(uri), "cost", MlflowClient(uri).get_run(run.info.run_id), {"k": "v"})
        register_seconds = time.perf_counter() - started
    sample = statistics.median(seconds)
    print(json.dumps({
        "sample_and_log_seconds_median": round(sample, 4), "sample_and_log_seconds_max": round(max(seconds), 4),
        "interval_seconds": args.interval, "share_of_run_time": round(sample / args.interval, 5),
        "register_seconds": round(register_seconds, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
