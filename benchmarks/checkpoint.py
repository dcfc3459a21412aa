"""What the per-epoch checkpoint costs: its write (capture, save, MLflow artifact, tags) against an epoch.

Trains the default model (seed_cnn, RMSprop, batch 128) for epochs on all 54,000 training images exactly as a
run does (pipeline.training_batches into model.fit), then writes the checkpoint `repeats` times into a scratch
SQLite store as callbacks.EpochRecorder does after every epoch. Prints one JSON line; run it with
`.venv/bin/python -m benchmarks.checkpoint` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from fashion_sweep import backend

backend.import_tensorflow()
import keras  # noqa: E402
import mlflow  # noqa: E402

from benchmarks.baseline import EpochTimer, load_split, reference_model  # noqa: E402
from fashion_sweep import checkpoint  # noqa: E402
from fashion_sweep.pipeline import training_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=None, help="images before the split (default: all)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs to time; the first is a warm-up")
    parser.add_argument("--repeats", type=int, default=10, help="checkpoint writes to time")
    args = parser.parse_args()

    split = load_split(args.train_size)
    keras.utils.set_random_seed(42)
    model = reference_model()
    timer = EpochTimer()
    batches = training_batches(split.x_train, split.y_train, 128, 42, 0, args.epochs)
    model.fit(batches, steps_per_epoch=math.ceil(len(split.y_train) / 128), epochs=args.epochs,
              validation_data=(split.x_val, split.y_val), callbacks=[timer], verbose=0)  # fmt: skip

    history = {"loss": [0.3] * 20, "val_loss": [0.3] * 20}  # a 20-epoch run's history, the longest by default
    with tempfile.TemporaryDirectory() as folder:
        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        experiment = mlflow.create_experiment("checkpoint-cost", artifact_location=Path(folder, "a").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            writes = []
            for epoch in range(1, args.repeats + 1):
                started = time.perf_counter()
                checkpoint.log_to_run(checkpoint.capture(model, epoch, history, 0.0))
                writes.append(time.perf_counter() - started)
            size = sum(p.stat().st_size for p in Path(folder, "a").rglob("slot-0.npz"))
    epoch_seconds = statistics.median(timer.seconds[1:] or timer.seconds)
    write_seconds = statistics.median(writes)
    print(json.dumps({
        "train_images": len(split.y_train), "epoch_seconds": round(epoch_seconds, 2),
        "checkpoint_seconds_median": round(write_seconds, 4), "checkpoint_seconds_max": round(max(writes), 4),
        "checkpoint_mb": round(size / 1e6, 2), "fraction_of_epoch": round(write_seconds / epoch_seconds, 5),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
