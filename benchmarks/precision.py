"""The default run (seed_cnn, 20 epochs) in float32 and in bfloat16: test accuracy and time, seed by seed.

Runs the real console script with `trainer.precision=float32` and `=bfloat16` for each seed, one after the
other (order alternating: the machine's speed drifts). Reports each run's accuracy and times, and per precision
the mean accuracy, the lowest and the speed-up in model.fit. Answers two questions of trainer.precision=auto on
this machine: is bfloat16 faster here, and does the default run still reach 92% in it?
`python -m benchmarks.precision [--seeds 42 1 2] [--train-size N] [--epochs E] [--out DIR]`;
writes <date>-precision.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import date
from pathlib import Path

from benchmarks.run import HERE, Harness, announced_machine, size_overrides, table, write_results

PRECISIONS = ("float32", "bfloat16")


def measure(harness: Harness, seeds: list[int], overrides: list[str]) -> list[dict]:
    harness.client.search_experiments()  # creates the store's tables now, not in the first timed run
    rows = []
    for i, seed in enumerate(seeds):
        for precision in PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]:
            finished, (run,) = harness.run(f"trainer.precision={precision}", f"trainer.seed={seed}", *overrides)
            rows.append({
                "precision": run.data.tags["precision"],
                "seed": seed,
                "wall_seconds": finished.wall_seconds,
                "fit_seconds": run.data.metrics["fit_seconds"],
                "test_accuracy": run.data.metrics["test_accuracy"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per precision: mean and lowest test accuracy, total time in model.fit."""
    by = {p: [r for r in rows if r["precision"] == p] for p in PRECISIONS}
    return {
        p: {
            "mean": statistics.mean(r["test_accuracy"] for r in runs),
            "lowest": min(r["test_accuracy"] for r in runs),
            "fit_seconds": sum(r["fit_seconds"] for r in runs),
        }
        for p, runs in by.items()
    }


def markdown(rows: list[dict], s: dict[str, dict[str, float]], settings: dict, cpu: dict) -> str:
    speedup = s["float32"]["fit_seconds"] / s["bfloat16"]["fit_seconds"]
    lines = [
        f"# The default run in float32 and bfloat16 ({date.today()})",
        "",
        f"CPU: {cpu['cpu']}, {cpu['cores']} cores, flags {', '.join(cpu['simd'])}; trainer.precision=auto picks "
        f"{cpu['auto_precision']}. Settings: {json.dumps(settings)}. `python -m benchmarks.precision`: per seed "
        "both precisions, one after the other (order alternating).",
        "",
        *table(
            ["precision", "seed", "wall time", "in model.fit", "test accuracy"],
            [
                [
                    r["precision"],
                    str(r["seed"]),
                    f"{r['wall_seconds']:.0f} s",
                    f"{r['fit_seconds']:.0f} s",
                    f"{r['test_accuracy']:.2%}",
                ]
                for r in rows
            ],
        ),  # fmt: skip
        "",
        *table(
            ["precision", "mean test accuracy", "lowest", "model.fit, all seeds"],
            [[p, f"{v['mean']:.2%}", f"{v['lowest']:.2%}", f"{v['fit_seconds']:.0f} s"] for p, v in s.items()],
        ),
        "",
        f"bfloat16 speed-up in model.fit: {speedup:.2f}x.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="trainer.seed of each pair")
    parser.add_argument("--train-size", type=int, default=None, help="images before the split (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="trainer.epochs (default: the reference's 20)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the results")
    args = parser.parse_args()

    overrides = size_overrides(args.train_size) + ([f"trainer.epochs={args.epochs}"] if args.epochs else [])
    settings = {"train_size": args.train_size or "all", "epochs": args.epochs or 20, "seeds": args.seeds}
    cpu = announced_machine()
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(Harness(Path(folder)), args.seeds, overrides)
    write_results(args.out, "precision", markdown(rows, summary(rows), settings, cpu))


if __name__ == "__main__":
    main()
