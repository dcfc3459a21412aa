"""Reference vs experiment=best_cnn: test accuracy and wall time, on the same machine and data.

Runs the real console script: the reference (the default config: seed_cnn, RMSprop at 0.001, 20 epochs) and
`experiment=best_cnn`, in pairs with the same seed and alternating order (the machine's speed drifts), then
best_cnn alone with the remaining seeds. Reports each run's wall time and test accuracy, the wall-time ratio
best_cnn / reference per pair, best_cnn's mean over seeds, the recipe best_cnn chose (tag `recipe`: one per
precision) and the instruction set oneDNN ran with. `--isa avx2` (or ONEDNN_MAX_CPU_ISA=AVX2 in the environment)
caps oneDNN's kernels at AVX2, as on a CPU without AVX512, and `trainer.precision=auto` then chooses as there.
`python -m benchmarks.best_cnn [--seeds 42 1 2] [--pairs 1] [--isa avx2] [--train-size N] [--epochs E] [--out DIR]`;
writes <date>-best-cnn[-<isa>].md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from datetime import date
from pathlib import Path

from benchmarks.run import HERE, Harness, announced_machine, size_overrides, table, write_results

RECIPES = {"reference": [], "best_cnn": ["experiment=best_cnn"]}


def one_run(harness: Harness, recipe: str, seed: int, overrides: list[str]) -> dict:
    finished, (run,) = harness.run(*RECIPES[recipe], f"trainer.seed={seed}", *overrides)
    return {
        "recipe": recipe,
        "seed": seed,
        "wall_seconds": finished.wall_seconds,
        "fit_seconds": run.data.metrics["fit_seconds"],
        "epochs": len(harness.epoch_seconds(run)),
        "test_accuracy": run.data.metrics["test_accuracy"],
        "precision": run.data.tags["precision"],
        "variant": run.data.tags.get("recipe", ""),  # tag recipe: best_cnn's variant for that precision
    }


def measure(harness: Harness, seeds: list[int], pairs: int, overrides: list[str]) -> list[dict]:
    harness.client.search_experiments()  # creates the store's tables now, not in the first timed run
    rows = []
    for i, seed in enumerate(seeds):
        order = ["reference", "best_cnn"] if i % 2 == 0 else ["best_cnn", "reference"]
        for recipe in order if i < pairs else ["best_cnn"]:
            rows.append(one_run(harness, recipe, seed, overrides))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    """Wall-time ratios of the pairs (same seed), accuracies of best_cnn's seeds."""
    wall = {(r["recipe"], r["seed"]): r["wall_seconds"] for r in rows}
    ratios = [wall["best_cnn", s] / wall["reference", s] for recipe, s in wall if recipe == "reference"]
    best = [r["test_accuracy"] for r in rows if r["recipe"] == "best_cnn"]
    return {
        "wall_ratios": ratios,
        "best_single": best[0],
        "best_mean": statistics.mean(best),
        "best_std": statistics.stdev(best) if len(best) > 1 else None,
        "n_seeds": len(best),
    }


def cap_note(settings: dict) -> str:
    cap = settings["ONEDNN_MAX_CPU_ISA"]
    return "" if cap == "not set" else f", capped by ONEDNN_MAX_CPU_ISA={cap}"


def markdown(rows: list[dict], s: dict, settings: dict, cpu: dict) -> str:
    ratios = ", ".join(f"{r:.2f}" for r in s["wall_ratios"])
    lines = [
        f"# Reference vs experiment=best_cnn ({date.today()})",
        "",
        f"CPU: {cpu['cpu']}, {cpu['cores']} cores, flags {', '.join(cpu['simd'])}; oneDNN ISA "
        f"{cpu['onednn_isa']}{cap_note(settings)}; trainer.precision=auto picks {cpu['auto_precision']}. "
        f"Settings: {json.dumps(settings)}. `python -m benchmarks.best_cnn`: each pair is the two recipes with one "
        "seed, one after the other (order alternating); the other seeds best_cnn alone.",
        "",
        *table(
            ["recipe", "seed", "wall time", "in model.fit", "epochs", "precision", "test accuracy"],
            [
                [
                    r["recipe"] + (f" ({r['variant']})" if r.get("variant") else ""),
                    str(r["seed"]),
                    f"{r['wall_seconds']:.0f} s",
                    f"{r['fit_seconds']:.0f} s",
                    str(r["epochs"]),
                    r["precision"],
                    f"{r['test_accuracy']:.2%}",
                ]
                for r in rows
            ],
        ),  # fmt: skip
        "",
        *table(
            ["what", "measured", "target"],
            [
                ["wall time best_cnn / reference (per pair)", ratios, "<= 1.00"],
                ["best_cnn test accuracy, first seed", f"{s['best_single']:.2%}", ">= 94.00%"],
                [
                    f"best_cnn mean of {s['n_seeds']} seed(s) (sample std)",
                    f"{s['best_mean']:.2%} ({s['best_std']:.2%})"
                    if s["best_std"] is not None
                    else f"{s['best_mean']:.2%} (one seed: no spread)",
                    ">= 93.80% (3 seeds)",
                ],
            ],
        ),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="trainer.seed of each best_cnn run")
    parser.add_argument("--pairs", type=int, default=1, help="how many of the seeds also run the reference")
    parser.add_argument("--train-size", type=int, default=None, help="images before the split (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="trainer.epochs of both (default: each recipe's)")
    parser.add_argument("--isa", default=None, help="cap oneDNN's kernels (ONEDNN_MAX_CPU_ISA), e.g. avx2")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the results")
    args = parser.parse_args()
    if args.isa:  # read by oneDNN when TensorFlow is imported: here, before the runs start
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.isa.upper()

    overrides = size_overrides(args.train_size) + ([f"trainer.epochs={args.epochs}"] if args.epochs else [])
    settings = {
        "train_size": args.train_size or "all",
        "epochs": args.epochs or "each recipe's",
        "seeds": args.seeds,
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "not set"),
    }
    cpu = announced_machine()
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(Harness(Path(folder)), args.seeds, args.pairs, overrides)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").lower()
    write_results(args.out, f"best-cnn-{cap}" if cap else "best-cnn", markdown(rows, summary(rows), settings, cpu))


if __name__ == "__main__":
    main()
