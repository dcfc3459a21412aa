"""Did the sweep pay? The grid's best against the sweep-free control (control=sweep_free), over seeds, per model.

Runs the real console script once per model: the model's learning-rate grid swept over the seeds, with the
schedule-free AdamW control beside it under the same parent (one control run per seed), all into a scratch store.
Reads back what the sweep itself recorded: the report's rows (test accuracy per run: the grid's selected setting
and the control are scored, once each seed) and the parent's tags (grid_gain_val_loss, epochs and seconds of each).
`python -m benchmarks.sweep_free [--models seed_cnn best_cnn] [--seeds 42 1 2] [--train-size N] [--epochs E]
[--out DIR]`; writes <date>-sweep-free.md after each model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import date
from pathlib import Path

from mlflow.entities import Run

from benchmarks.run import HERE, Harness, announced_machine, size_overrides, table, write_results

# Each model's grid, as a user sweeps it: seed_cnn is the reference's study (lr_sweep's five rates) at the
# reference's 20 epochs; best_cnn's one-cycle peak (0.003) with a rate either side.
STUDIES = {
    "seed_cnn": ["experiment=lr_sweep", "trainer.epochs=20"],
    "best_cnn": ["experiment=best_cnn", "optimizer.lr=0.001,0.003,0.01"],
}


def parent_of(harness: Harness) -> Run:
    experiment = harness.client.get_experiment_by_name(f"bench-{harness.invocations}")
    assert experiment is not None, "the sweep created no experiment"
    (parent,) = harness.client.search_runs([experiment.experiment_id], "tags.sweep_role = 'parent'")
    return parent


def accuracies(runs: list[Run], selected_lr: str | None) -> list[float]:
    """Test accuracy of each seed's run: the control's (selected_lr None) or the grid's at selected_lr."""
    if selected_lr is None:
        chosen = [r for r in runs if r.data.tags.get("control")]
    else:
        chosen = [r for r in runs if not r.data.tags.get("control") and r.data.params["optimizer.lr"] == selected_lr]
    return [r.data.metrics["test_accuracy"] for r in sorted(chosen, key=lambda r: int(r.data.params["trainer.seed"]))]


def study(harness: Harness, model: str, seeds: list[int], overrides: list[str]) -> dict:
    seeded = f"trainer.seed={','.join(map(str, seeds))}"
    finished, runs = harness.run(*STUDIES[model], seeded, "control=sweep_free", *overrides, multirun=True)
    parent = parent_of(harness)
    tags, best_lr = parent.data.tags, parent.data.params["best_lr"]
    grid, control = accuracies(runs, best_lr), accuracies(runs, None)
    return {
        "model": model,
        "best_lr": best_lr,
        "grid_accuracy": grid,
        "control_accuracy": control,
        "grid_gain_val_loss": float(tags["grid_gain_val_loss"]),
        "grid_epochs": int(tags["grid_epochs"]),
        "control_epochs": int(tags["control_epochs"]),
        "grid_seconds": float(tags["grid_seconds"]),
        "control_seconds": float(tags["control_seconds"]),
        "sweep_wall_seconds": finished.wall_seconds,
        "verdict": tags["control_verdict"],
    }


def mean_std(values: list[float]) -> str:
    spread = f" ({statistics.stdev(values):.2%})" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2%}{spread}"


def markdown(rows: list[dict], settings: dict, cpu: dict) -> str:
    lines = [
        f"# The grid's best against the sweep-free control ({date.today()})",
        "",
        f"CPU: {cpu['cpu']}, {cpu['cores']} cores, flags {', '.join(cpu['simd'])}; trainer.precision="
        f"{cpu['auto_precision']}. Settings: {json.dumps(settings)}. `python -m benchmarks.sweep_free`: per model one "
        "`fashion-sweep --multirun <grid> trainer.seed=<seeds> control=sweep_free`; the control is schedule-free "
        "AdamW at its default lr 0.0025, one run per seed. Accuracies: test set, mean (sample std) over the seeds; "
        "the grid's is its selected setting's (chosen on mean validation loss). Seconds: all runs of each.",
        "",
        *table(
            [
                "model",
                "grid's best lr",
                "grid's best: test accuracy",
                "sweep-free control",
                "difference",
                "grid epochs / seconds",
                "control epochs / seconds",
                "grid / control time",
            ],
            [
                [
                    r["model"],
                    r["best_lr"],
                    mean_std(r["grid_accuracy"]),
                    mean_std(r["control_accuracy"]),
                    f"{statistics.mean(r['grid_accuracy']) - statistics.mean(r['control_accuracy']):+.2%}",
                    f"{r['grid_epochs']} / {r['grid_seconds']:.0f} s",
                    f"{r['control_epochs']} / {r['control_seconds']:.0f} s",
                    f"{r['grid_seconds'] / r['control_seconds']:.1f}x",
                ]
                for r in rows
            ],
        ),  # fmt: skip
        "",
        "Per seed (test accuracy, seeds in order):",
        "",
        *[
            f"- {r['model']}: grid's best {[f'{a:.2%}' for a in r['grid_accuracy']]}, control "
            f"{[f'{a:.2%}' for a in r['control_accuracy']]}; the sweep took {r['sweep_wall_seconds']:.0f} s in all. "
            f"The parent's verdict: {r['verdict']}"
            for r in rows
        ],  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(STUDIES), default=list(STUDIES), help="which studies")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="trainer.seed of every setting")
    parser.add_argument("--train-size", type=int, default=None, help="images before the split (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="trainer.epochs of every run (default: the study's)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the results")
    args = parser.parse_args()

    overrides = size_overrides(args.train_size) + ([f"trainer.epochs={args.epochs}"] if args.epochs else [])
    settings = {"train_size": args.train_size or "all", "epochs": args.epochs or "the study's", "seeds": args.seeds}
    cpu = announced_machine()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        harness = Harness(Path(folder))
        for model in args.models:
            rows.append(study(harness, model, args.seeds, overrides + ["tracking.log_model=false"]))
            print(json.dumps(rows[-1]), flush=True)
            write_results(args.out, "sweep-free", markdown(rows, settings, cpu))  # what is measured so far


if __name__ == "__main__":
    main()
