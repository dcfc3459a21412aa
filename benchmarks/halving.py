"""Which learning rate, and at what cost: the grid of experiment=lr_sweep vs hydra/sweeper=halving vs lr_find.

Runs the real console script three ways, one after the other on the same machine, data and epochs, each into
its own experiment of one scratch store: the grid (every rate all epochs), the same sweep with successive
halving, and the LR range test. Reports each one's wall time as a fraction of the grid's and whether its answer
agrees: halving must pick the grid's best rate, lr_find's suggestion must lie within a factor of 10 of it.
`python -m benchmarks.halving [--train-size N] [--epochs E] [--out DIR] [OVERRIDE ...]`; writes
<date>-halving-<slice>.md (OVERRIDEs go to every run, e.g. trainer.precision=float32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from datetime import date
from pathlib import Path

from benchmarks.run import HERE, Harness, announced_machine, table, write_results


def parent_param(harness: Harness, key: str) -> str:
    """A param of the newest sweep's parent run (the grid's or halving's best_lr)."""
    experiment = harness.client.get_experiment_by_name(f"bench-{harness.invocations}")
    assert experiment is not None, "the sweep created no experiment"
    (parent,) = harness.client.search_runs([experiment.experiment_id], "tags.sweep_role = 'parent'")
    return parent.data.params[key]


def compare_methods(harness: Harness, overrides: list[str]) -> list[dict]:
    grid, runs = harness.run("experiment=lr_sweep", *overrides, multirun=True)
    grid_best = float(parent_param(harness, "best_lr"))
    grid_epochs = sum(len(harness.epoch_seconds(run)) for run in runs)
    halved, runs = harness.run("experiment=lr_sweep", "hydra/sweeper=halving", *overrides, multirun=True)
    halving_best = float(parent_param(harness, "best_lr"))
    halving_epochs = sum(len(harness.epoch_seconds(run)) for run in runs)
    found, (run,) = harness.run("experiment=lr_find", *overrides)
    suggested = run.data.metrics["suggested_lr"]
    return [
        {"method": "grid", "wall_seconds": grid.wall_seconds, "epochs": grid_epochs, "lr": grid_best, "agrees": True},
        {"method": "halving", "wall_seconds": halved.wall_seconds, "epochs": halving_epochs, "lr": halving_best,
         "agrees": halving_best == grid_best},
        {"method": "lr_find", "wall_seconds": found.wall_seconds, "epochs": 0, "lr": suggested,
         "agrees": abs(math.log10(suggested / grid_best)) <= 1},
    ]  # fmt: skip


def markdown(rows: list[dict], settings: dict, cpu: dict) -> str:
    grid = rows[0]["wall_seconds"]
    target = {"grid": "", "halving": "<= 0.40, same lr", "lr_find": "<= 0.10, within 10x"}
    lines = [
        f"# Which learning rate: grid vs successive halving vs LR range test ({date.today()})",
        "",
        f"CPU: {cpu['cpu']}, {cpu['cores']} cores, flags {', '.join(cpu['simd'])}; trainer.precision="
        f"{cpu['auto_precision']}. Settings: {json.dumps(settings)}.",
        "Each method ran once, one after the other, on the same data and epochs (`python -m benchmarks.halving`).",
        "",
        *table(
            ["method", "wall time", "of the grid's", "target", "epochs trained", "learning rate", "agrees"],
            [
                [
                    r["method"],
                    f"{r['wall_seconds']:.0f} s",
                    f"{r['wall_seconds'] / grid:.2f}",
                    target[r["method"]],
                    str(r["epochs"]),
                    f"{r['lr']:.3g}",
                    "yes" if r["agrees"] else "NO",
                ]
                for r in rows
            ],
        ),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=None, help="images before the split (default: all)")
    parser.add_argument("--epochs", type=int, default=10, help="trainer.epochs of the sweeps (lr_sweep's 10)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the results")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.precision=float32")
    args = parser.parse_args()

    overrides = [f"trainer.epochs={args.epochs}", "tracking.log_model=false", *args.overrides]
    if args.train_size:
        overrides.append(f"data.train_size={args.train_size}")
    settings = {"train_size": args.train_size or "all", "epochs": args.epochs, "overrides": args.overrides}
    if isa := os.environ.get("ONEDNN_MAX_CPU_ISA"):
        settings["ONEDNN_MAX_CPU_ISA"] = isa  # oneDNN's kernels capped at this ISA
    cpu = announced_machine()
    with tempfile.TemporaryDirectory() as folder:
        rows = compare_methods(Harness(Path(folder)), overrides)
    write_results(args.out, f"halving-{args.train_size or 'full'}", markdown(rows, settings, cpu))


if __name__ == "__main__":
    main()
