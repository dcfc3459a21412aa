"""The comparison of one sweep: a table and two figures built from the MLflow store alone.

Owns reading a sweep back from MLflow and writing its report (summary.csv, summary.md, lr_effect.png,
val_curves.png); it never imports the training code. `fashion-sweep-compare` rebuilds a report any time.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fashion_sweep import plots

LR = "optimizer.lr"
COLUMNS = (
    "best_val_loss", "best_epoch", "final_val_loss", "final_loss", "final_val_accuracy", "test_accuracy",
    "epochs", "seconds", "status", "run_id", "note",
)  # fmt: skip
TERMINAL_COLUMNS = [c for c in COLUMNS if c != "run_id"]
BEST_IS = "best = lowest validation loss reached in any epoch; diverged or failed runs are never best"


@dataclass
class Report:
    """A sweep's table (best first), its swept keys, its best row and the files written."""

    rows: list[dict[str, Any]]
    swept: list[str]
    best: dict[str, Any] | None
    files: list[Path]


def default_tracking_uri() -> str:
    """The project's local store, as conf/tracking/local.yaml names it: ./mlruns/mlflow.db."""
    return f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def find_parent(client: MlflowClient, sweep: str | None) -> Run:
    """The parent run of a sweep, by sweep id (= parent run id) or parent run name; the latest if None."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    matches = (
        [f"tags.sweep_id = '{sweep}'", f"attributes.run_name = '{sweep}'"] if sweep else ["attributes.run_name != ''"]
    )
    for match in matches:  # MLflow's search has no OR: try the id, then the name
        query = f"tags.sweep_role = 'parent' and {match}"
        runs = client.search_runs(experiment_ids, query, order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0]
    raise LookupError(f"no sweep {sweep!r} in the store" if sweep else "no sweep in the store yet")


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    return client.search_runs([parent.info.experiment_id], query, max_results=10_000)


def swept_keys(params: list[dict[str, str]]) -> list[str]:
    """The params every run has and whose values differ between runs, learning rate first (always)."""
    shared = sorted(set.intersection(*(set(p) for p in params))) if params else []
    varying = [k for k in shared if len({p[k] for p in params}) > 1 and k != LR]
    return [LR, *varying]


def status_of(run: Run) -> str:
    if run.data.tags.get("diverged") == "true":
        return "DIVERGED"
    return run.info.status


def summarize(run: Run, history: dict[str, list[float]], swept: list[str]) -> dict[str, Any]:
    """One table row: the swept values, then COLUMNS."""
    val_loss = history.get("val_loss", [])
    finite = [v for v in val_loss if math.isfinite(v)]
    best_index = val_loss.index(min(finite)) if finite else None
    metrics = run.data.metrics
    row: dict[str, Any] = {key: run.data.params.get(key, "") for key in swept}
    row.update(
        best_val_loss=min(finite) if finite else math.nan,
        best_epoch=best_index + 1 if best_index is not None else "",
        final_val_loss=metrics.get("val_loss", math.nan),
        final_loss=metrics.get("loss", math.nan),
        final_val_accuracy=metrics.get("val_accuracy", math.nan),
        test_accuracy=metrics.get("test_accuracy", math.nan),
        epochs=len(history.get("loss", [])),
        seconds=round(((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000, 1),
        status=status_of(run),
        run_id=run.info.run_id,
        note=run.data.tags.get("error", ""),
    )
    return row


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished runs by best_val_loss, then the rest (diverged, failed, killed) by learning rate."""

    def key(row: dict[str, Any]) -> tuple:
        finished = row["status"] == "FINISHED" and math.isfinite(row["best_val_loss"])
        return (not finished, row["best_val_loss"] if finished else 0.0, float(row[LR] or "nan"), row["run_id"])

    return sorted(rows, key=key)


def cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


Series = dict[str, tuple[list[float], list[float], list[float]]]


def lr_series(rows: list[dict[str, Any]], swept: list[str]) -> Series:
    """For plots.lr_effect: per combination of the other swept values, (lrs, final losses, final val_losses),
    by learning rate; a run that did not finish gets an infinite loss (drawn as an x)."""
    series: Series = {}
    for row in sorted(rows, key=lambda r: float(r[LR] or "nan")):
        label = ", ".join(f"{k}={row[k]}" for k in swept[1:])
        lrs, train, val = series.setdefault(label, ([], [], []))
        failed = row["status"] != "FINISHED"
        lrs.append(float(row[LR] or "nan"))
        train.append(math.inf if failed else row["final_loss"])
        val.append(math.inf if failed else row["final_val_loss"])
    return series


def write_report(client: MlflowClient, parent: Run, out: Path) -> Report:
    """Read the sweep's child runs, write the four report files into out, return what was written."""
    runs = child_runs(client, parent)
    swept = swept_keys([r.data.params for r in runs])
    histories = {
        r.info.run_id: {
            m: [p.value for p in sorted(client.get_metric_history(r.info.run_id, m), key=lambda p: p.step)]
            for m in ("loss", "val_loss", "val_accuracy")
        }
        for r in runs
    }
    rows = rank([summarize(r, histories[r.info.run_id], swept) for r in runs])
    best = rows[0] if rows and rows[0]["status"] == "FINISHED" else None
    columns = [*swept, *COLUMNS]

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([cell(row[c]) for c in columns] for row in rows)
    title = f"# Sweep {parent.info.run_name} ({parent.info.run_id})\n\n{len(rows)} runs; {BEST_IS}.\n\n"
    (out / "summary.md").write_text(title + markdown(rows, columns))

    best_lr = float(best[LR]) if best else None
    plots.lr_effect(lr_series(rows, swept), best_lr).savefig(out / "lr_effect.png", dpi=110)
    labelled = {
        ", ".join(f"{k}={row[k]}" for k in swept) + f" ({row['status']})": histories[row["run_id"]] for row in rows
    }
    plots.val_curves(labelled).savefig(out / "val_curves.png", dpi=110)
    files = [out / name for name in ("lr_effect.png", "val_curves.png", "summary.csv", "summary.md")]
    return Report(rows=rows, swept=swept, best=best, files=files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fashion-sweep-compare", description="Rebuild a sweep's comparison report from the MLflow store."
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: ./mlruns/mlflow.db)")
    parser.add_argument("--sweep", default=None, help="sweep id (= parent run id) or parent run name; default: latest")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default: reports/<sweep id>)")
    args = parser.parse_args(argv)

    uri = args.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        sys.exit(f"fashion-sweep-compare: no MLflow store at {uri}; run a sweep first or pass --tracking-uri")
    client = MlflowClient(uri)
    try:
        parent = find_parent(client, args.sweep)
        report = write_report(client, parent, args.out or Path("reports") / parent.info.run_id)
    except (LookupError, MlflowException, OSError) as err:
        sys.exit(f"fashion-sweep-compare: {' '.join(str(err).split())} ({uri})")
    print(markdown(report.rows, [*report.swept, *TERMINAL_COLUMNS]))
    print(f"Report of sweep {parent.info.run_name} written to {report.files[0].parent}")


if __name__ == "__main__":
    main()
