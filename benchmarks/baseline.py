"""The plain Keras script a user would write: the reference's CNN, NumPy arrays straight into model.fit.

It is what fashion-sweep's training throughput is measured against (benchmarks/run.py). Same images as the
harness's default run (its loader and split are used only to get the arrays, outside the timing), same
network, RMSprop, lr 0.001, batch 128, nothing tuned. Prints one JSON line: the seconds of every epoch.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import keras
from keras import layers

from fashion_sweep import data


class EpochTimer(keras.callbacks.Callback):
    """Seconds from the start of each epoch to its end, validation included (as the harness measures)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def load_split(train_size: int | None) -> data.Split:
    """The harness's default split (seed 42, 10% validation): the same images, not timed."""
    folder = data.locate(None, "/usr/share/datasets/fashion-mnist", None, url=None)
    return data.split(data.load(folder), val_fraction=0.1, train_size=train_size, seed=42)


def reference_model(**compile_options: Any) -> keras.Model:
    """The reference's network, compiled as the reference did (RMSprop, lr 0.001); compile_options add to it."""
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Dropout(0.25),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=0.001),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        **compile_options,
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs to train (the first is the warm-up)")
    parser.add_argument("--train-size", type=int, default=None, help="a stratified slice, as data.train_size")
    args = parser.parse_args()

    split = load_split(args.train_size)
    keras.utils.set_random_seed(42)
    model = reference_model()
    timer = EpochTimer()
    started = time.perf_counter()
    history = model.fit(
        split.x_train,
        split.y_train,
        batch_size=128,
        epochs=args.epochs,
        validation_data=(split.x_val, split.y_val),
        callbacks=[timer],
        verbose=0,
    ).history
    fit_seconds = time.perf_counter() - started
    result = {
        "train_images": len(split.x_train),
        "epoch_seconds": timer.seconds,
        "fit_seconds": fit_seconds,
        "val_accuracy": history["val_accuracy"][-1],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
