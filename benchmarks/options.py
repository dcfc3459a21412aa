"""Which training options make seed_cnn train faster on this machine: each option against plain Keras.

`python -m benchmarks.options` trains benchmarks/baseline.py's network once plain and once with one option,
interleaved (plain, option, plain, option, ...) in fresh processes, and prints (and writes to
results/<date>-options.md) images/s and the median ratio option/plain per option. An option the harness
should adopt must beat 1.0 clearly, and keep seed_cnn's accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks.run import images_per_second, machine, timed
from fashion_sweep.backend import set_precision

OPTIONS = {
    "plain": "the baseline as it is",
    "eval_batch_1024": "validation_batch_size=1024 in fit",
    "steps_per_execution_16": "compile(steps_per_execution=16): 16 batches per tf.function call",
    "tf_data": "tf.data from the arrays: cache, shuffle, batch, prefetch(AUTOTUNE)",
    "threads_2_1": "2 intra-op threads, 1 inter-op thread",
    "mixed_bfloat16": "trainer.precision=bfloat16: policy mixed_bfloat16, bias gradients summed in float32",
    "onednn_off": "TF_ENABLE_ONEDNN_OPTS=0",
    "xla": "compile(jit_compile=True)",
}


def train_once(option: str, epochs: int, train_size: int | None) -> dict[str, Any]:
    """Train the baseline network with one option in this process; return its epoch seconds."""
    import keras
    import tensorflow as tf

    from benchmarks.baseline import EpochTimer, load_split, reference_model

    if option == "threads_2_1":
        tf.config.threading.set_intra_op_parallelism_threads(2)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if option == "mixed_bfloat16":
        set_precision("bfloat16")
    split = load_split(train_size)
    keras.utils.set_random_seed(42)
    model = reference_model(
        steps_per_execution=16 if option == "steps_per_execution_16" else 1, jit_compile=option == "xla"
    )
    timer = EpochTimer()
    fit: dict[str, Any] = {"epochs": epochs, "callbacks": [timer], "verbose": 0}
    if option == "tf_data":
        train = tf.data.Dataset.from_tensor_slices((split.x_train, split.y_train)).cache()
        train = train.shuffle(len(split.x_train), seed=42).batch(128).prefetch(tf.data.AUTOTUNE)
        val = tf.data.Dataset.from_tensor_slices((split.x_val, split.y_val)).batch(1024).cache()
        model.fit(train, validation_data=val.prefetch(tf.data.AUTOTUNE), **fit)
    else:
        batches = {"validation_batch_size": 1024} if option == "eval_batch_1024" else {}
        model.fit(
            split.x_train, split.y_train, batch_size=128, validation_data=(split.x_val, split.y_val), **fit, **batches
        )
    return {"train_images": len(split.x_train), "epoch_seconds": timer.seconds}


def measure(option: str, epochs: int, train_size: int | None) -> float:
    """Images/s of one fresh process training with option."""
    env = {**os.environ, **({"TF_ENABLE_ONEDNN_OPTS": "0"} if option == "onednn_off" else {})}
    size = [] if train_size is None else ["--train-size", str(train_size)]
    command = [sys.executable, "-m", "benchmarks.options", "--one", option, "--epochs", str(epochs), *size]
    result = json.loads(timed(command, Path.cwd(), env).stdout.strip().splitlines()[-1])
    return images_per_second(result["train_images"], result["epoch_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=[o for o in OPTIONS if o != "plain"], choices=OPTIONS)
    parser.add_argument("--pairs", type=int, default=2, help="plain/option pairs per option")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per process (the first is the warm-up)")
    parser.add_argument("--train-size", type=int, default=10000, help="a stratified slice of the training images")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for the table")
    parser.add_argument("--one", choices=OPTIONS, help=argparse.SUPPRESS)  # internal: train once, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(train_once(args.one, args.epochs, args.train_size)))
        return
    setting = (args.epochs, args.train_size)
    cpu = machine()
    lines = [
        f"CPU: {cpu['cpu']}, {cpu['cores']} cores, flags {', '.join(cpu['simd'])}; trainer.precision="
        f"{cpu['auto_precision']}.",
        "",
        f"Measured {date.today()}: {args.pairs} interleaved pairs per option, {args.epochs} epochs per process "
        f"(the first is the warm-up) on a {args.train_size}-image slice (90% trained on, 10% validation).",
        "",
        "| option | what | plain images/s | option images/s | ratio option/plain (median) |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for option in args.options:
        pairs = [(measure("plain", *setting), measure(option, *setting)) for _ in range(args.pairs)]  # interleaved
        ratio = statistics.median(o / p for p, o in pairs)
        plain, faster = statistics.median(p for p, _ in pairs), statistics.median(o for _, o in pairs)
        lines.append(f"| {option} | {OPTIONS[option]} | {plain:.0f} | {faster:.0f} | {ratio:.2f} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{date.today()}-options.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
