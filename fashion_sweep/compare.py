"""The comparison of one sweep: a table and two figures built from the MLflow store alone.

Owns reading a sweep back from MLflow and writing its report (summary.csv, summary.md, lr_effect.png,
val_curves.png; with seed replicates summary.* has one row per setting and runs.csv, runs.md one per run; a
halving sweep's pruned runs are shown apart and compared at its rungs; a control run beside the grid gets its own
row and line and a verdict, never the best); it never imports the training code.
`fashion-sweep-compare` rebuilds a report any time.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fashion_sweep import credentials, plots, runs, store

LR = "optimizer.lr"
SEED = "trainer.seed"
COLUMNS = (
    "best_val_loss", "best_epoch", "final_val_loss", "final_loss", "final_val_accuracy", "test_accuracy",
    "epochs", "seconds", "status", "run_id", "note",
)  # fmt: skip
SETTING_COLUMNS = (
    "n", "n_finished", "best_val_loss_mean", "best_val_loss_std", "test_accuracy_mean", "test_accuracy_std", "status",
)  # fmt: skip
BEST_IS = "best = lowest validation loss reached in any epoch; diverged or failed runs are never best"
BEST_OF_HALVING_IS = (
    "best = lowest validation loss reached in any epoch by a run that reached the last rung; pruned, diverged or"
    " failed runs are never best; val_loss@k = lowest validation loss in epochs 1..k"
)
TESTED_ONCE_IS = (
    "test_accuracy is the selected setting's alone: the sweep chose on validation loss, then met the test set once"
    " (tracking.test_set=selected)"
)
BEST_SETTING_IS = (
    f"one row per setting, mean and std over its finished runs ({SEED} differs); best = lowest mean of the lowest"
    " validation loss in any epoch, among settings whose runs all finished (runs.md: each run)"
)

CONTROL = "control"  # the tables' first column when the sweep has a control run: its label, blank for the grid
CONTROL_NAMES = {"sweep_free": "sweep-free"}  # control.name (runs.CONTROL_TAG) as the report says it
VERDICT_TAG = "control_verdict"  # on the parent: the grid's best against the control, in a sentence

Row = dict[str, Any]


@dataclass
class Report:
    """A sweep's runs (best first), its swept keys, its best row and the files written; table and columns are
    summary.md's: the runs, or one row per setting when seeds differ (best is then a setting, with its means
    as best_val_loss and test_accuracy)."""

    rows: list[Row]
    swept: list[str]
    best: Row | None
    files: list[Path]
    table: list[Row]
    columns: list[str]
    best_is: str
    controls: list[Row] = field(default_factory=list)  # the control's runs (control=sweep_free): never best
    verdict: dict[str, str] = field(default_factory=dict)  # the grid's best against the control (control_verdict)

    @property
    def terminal_columns(self) -> list[str]:
        return [c for c in self.columns if c != "run_id"]


def swept_keys(params: list[dict[str, str]]) -> list[str]:
    """The params every run has and whose values differ between runs, learning rate first (always)."""
    shared = sorted(set.intersection(*(set(p) for p in params))) if params else []
    varying = [k for k in shared if len({p[k] for p in params}) > 1 and k != LR]
    return [LR, *varying]


def halving_rungs(parent_tags: dict[str, str]) -> list[int]:
    """The rung epochs of a successive-halving sweep (parent tag halving_rungs, e.g. "1,3,10"); [] otherwise."""
    return sorted({int(k) for k in parent_tags.get("halving_rungs", "").split(",") if k.strip()})


def lowest(values: list[float], epochs: int) -> float | str:
    """The lowest finite value of epochs 1..epochs; blank if the run did not reach that epoch."""
    finite = [v for v in values[:epochs] if math.isfinite(v)]
    return "" if len(values) < epochs else min(finite, default=math.nan)


def more_metrics(children: list[Run]) -> list[str]:
    """The per-epoch metrics the sweep's runs logged beyond loss, accuracy and their val_ twins (a metric compiled
    into the model later): each gets a final_<name> column."""
    known = set(runs.EPOCH_METRICS_BEFORE_TAG)
    names = (name for run in children for name in runs.epoch_metrics(run) if name not in known)
    return list(dict.fromkeys(names))


def summarize(
    run: Run, history: dict[str, list[float]], swept: list[str], rungs: Sequence[int] = (), more: Sequence[str] = ()
) -> Row:
    """One table row: the swept values, then COLUMNS, val_loss@k for each rung k of a halving sweep, and the final
    value of each metric in more."""
    val_loss = history.get("val_loss", [])
    finite = [v for v in val_loss if math.isfinite(v)]
    best_index = val_loss.index(min(finite)) if finite else None
    metrics, tags = run.data.metrics, run.data.tags
    status = runs.status_of(run)
    row: Row = {key: run.data.params.get(key, "") for key in swept}
    row.update(
        best_val_loss=min(finite) if finite else math.nan,
        best_epoch=best_index + 1 if best_index is not None else "",
        final_val_loss=metrics.get("val_loss", math.nan),
        final_loss=metrics.get("loss", math.nan),
        final_val_accuracy=metrics.get("val_accuracy", math.nan),
        test_accuracy=metrics.get("test_accuracy", math.nan),
        epochs=len(history.get("loss", [])),
        seconds=round(((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000, 1),
        status=status,
        run_id=run.info.run_id,
        note=tags.get("error", f"pruned at epoch {tags.get('pruned_at_epoch', '?')}" if status == "PRUNED" else ""),
    )
    row.update({f"val_loss@{k}": lowest(val_loss, k) for k in rungs})
    row.update({f"final_{name}": metrics.get(name, math.nan) for name in more})
    return row


def run_columns(swept: list[str], rungs: Sequence[int] = (), more: Sequence[str] = ()) -> list[str]:
    """The runs table's columns: the swept keys, then COLUMNS with val_loss@k for each rung after best_epoch and
    final_<name> for each metric in more after the other final values."""
    at_rungs = [f"val_loss@{k}" for k in rungs]
    finals = [f"final_{name}" for name in more]
    return [*swept, *COLUMNS[:2], *at_rungs, *COLUMNS[2:5], *finals, *COLUMNS[5:]]


def rank(rows: list[Row]) -> list[Row]:
    """Finished runs by best_val_loss, then pruned runs (the later their rung the higher, then by best_val_loss),
    then the rest (diverged, failed, killed, scheduled) by learning rate."""

    def key(row: Row) -> tuple:
        loss = row["best_val_loss"] if math.isfinite(row["best_val_loss"]) else math.inf
        if row["status"] == "FINISHED" and math.isfinite(loss):
            return (0, 0, loss, float(row[LR] or "nan"), row["run_id"])
        if row["status"] == "PRUNED":
            return (1, -row.get("epochs", 0), loss, float(row[LR] or "nan"), row["run_id"])
        return (2, 0, 0.0, float(row[LR] or "nan"), row["run_id"])

    return sorted(rows, key=key)


def status_summary(statuses: list[str]) -> str:
    """FINISHED if all are, else the count of each, finished first: "2 FINISHED, 1 DIVERGED"."""
    if statuses and set(statuses) == {"FINISHED"}:
        return "FINISHED"
    counts = sorted(Counter(statuses).items(), key=lambda item: (item[0] != "FINISHED", item[0]))
    return ", ".join(f"{n} {status}" for status, n in counts)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); nan where there are too few values."""
    mean = float(np.mean(values)) if values else math.nan
    return mean, float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


def settings(rows: list[Row], keys: list[str]) -> list[Row]:
    """One row per setting (a combination of the values of keys, the swept keys but the seed): its runs, how many
    finished, the mean and std over those of best_val_loss and test_accuracy, and a status; best first:
    settings whose runs all finished by mean best_val_loss, then the others by learning rate."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    table = []
    for values, members in groups.items():
        finished = [r for r in members if r["status"] == "FINISHED"]
        setting: Row = dict(zip(keys, values, strict=True), n=len(members), n_finished=len(finished))
        for metric in ("best_val_loss", "test_accuracy"):
            setting[f"{metric}_mean"], setting[f"{metric}_std"] = mean_std([r[metric] for r in finished])
        setting["status"] = status_summary([r["status"] for r in members])
        table.append(setting)

    def key(setting: Row) -> tuple:
        complete = setting["status"] == "FINISHED" and math.isfinite(setting["best_val_loss_mean"])
        return (not complete, setting["best_val_loss_mean"] if complete else 0.0, float(setting[LR] or "nan"))

    return sorted(table, key=key)


def best_setting(table: list[Row]) -> Row | None:
    """The first setting if all its runs finished, with its means as best_val_loss and test_accuracy."""
    if not table or table[0]["status"] != "FINISHED" or not math.isfinite(table[0]["best_val_loss_mean"]):
        return None
    best = table[0]
    return {**best, "best_val_loss": best["best_val_loss_mean"], "test_accuracy": best["test_accuracy_mean"]}


def cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown(rows: list[Row], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


Series = dict[str, tuple[list[float], list[float], list[float]]]
Pruned = dict[str, list[tuple[float, float, float, int]]]


def lr_groups(rows: list[Row], keys: list[str]) -> dict[str, dict[float, list[Row]]]:
    """Rows by label (the values of keys but the learning rate), then by learning rate, ascending."""
    groups: dict[str, dict[float, list[Row]]] = {}
    for row in sorted(rows, key=lambda r: float(r[LR] or "nan")):
        label = ", ".join(f"{k}={row[k]}" for k in keys if k != LR)
        groups.setdefault(label, {}).setdefault(float(row[LR] or "nan"), []).append(row)
    return groups


def final_losses(runs: list[Row]) -> tuple[tuple[float, float], tuple[float, float]]:
    """(mean, std) of the final training and of the final validation loss over the finished runs; inf if none."""
    finished = [r for r in runs if r["status"] == "FINISHED"]
    if not finished:
        return (math.inf, math.nan), (math.inf, math.nan)
    return mean_std([r["final_loss"] for r in finished]), mean_std([r["final_val_loss"] for r in finished])


def lr_series(rows: list[Row], keys: list[str]) -> Series:
    """For plots.lr_effect: per combination of the other values of keys, (lrs, final losses, final val_losses) by
    learning rate, each the mean over that learning rate's finished runs (its seeds); a learning rate none of whose
    runs finished gets an infinite loss (drawn as an x). Pruned runs are left out: see pruned_points."""
    series: Series = {}
    for label, by_lr in lr_groups([r for r in rows if r["status"] != "PRUNED"], keys).items():
        stats = [final_losses(runs) for runs in by_lr.values()]
        series[label] = (list(by_lr), [train[0] for train, _ in stats], [val[0] for _, val in stats])
    return series


def lr_spread(rows: list[Row], keys: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """The standard deviations (over seeds) of lr_series's means, in the same order; nan below two runs."""
    spread: dict[str, tuple[list[float], list[float]]] = {}
    for label, by_lr in lr_groups([r for r in rows if r["status"] != "PRUNED"], keys).items():
        stats = [final_losses(runs) for runs in by_lr.values()]
        spread[label] = ([train[1] for train, _ in stats], [val[1] for _, val in stats])
    return spread


def pruned_points(rows: list[Row], keys: list[str]) -> Pruned:
    """For plots.lr_effect: per label as in lr_series, each pruned run's (lr, last loss, last val_loss, epochs)."""
    groups = lr_groups([r for r in rows if r["status"] == "PRUNED"], keys)
    return {
        label: [(lr, r["final_loss"], r["final_val_loss"], r["epochs"]) for lr, runs in by_lr.items() for r in runs]
        for label, by_lr in groups.items()
    }


def summary(
    rows: list[Row], swept: list[str], rungs: list[int], more: Sequence[str] = ()
) -> tuple[list[Row], list[str], Row | None, str]:
    """summary.md's table, its columns, the best row and how best was chosen: the runs (ranked), or one row per
    setting when the seed is swept."""
    if SEED in swept:
        keys = [k for k in swept if k != SEED]
        table = settings(rows, keys)
        return table, [*keys, *SETTING_COLUMNS], best_setting(table), BEST_SETTING_IS
    best = rows[0] if rows and rows[0]["status"] == "FINISHED" else None
    return rows, run_columns(swept, rungs, more), best, BEST_OF_HALVING_IS if rungs else BEST_IS


def curve_label(row: Row, swept: list[str]) -> str:
    """A run's label in val_curves.png: its swept values and its status ("pruned at epoch k" if pruned)."""
    status = row["note"] if row["status"] == "PRUNED" else row["status"]
    return ", ".join(f"{k}={row[k]}" for k in swept) + f" ({status})"


def write_table(path: Path, rows: list[Row], columns: list[str], title: str, after: str = "") -> list[Path]:
    """path.csv and path.md (the title, the table, then after); returns both."""
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([cell(row[c]) for c in columns] for row in rows)
    path.with_suffix(".md").write_text(title + markdown(rows, columns) + after)
    return [path.with_suffix(".csv"), path.with_suffix(".md")]


def write_report(client: MlflowClient, parent: Run, out: Path) -> Report:
    """Read the sweep's child runs, write the report files into out, return what was written."""
    children = runs.child_runs(client, parent.info.experiment_id, parent.info.run_id)
    grid = [r for r in children if runs.CONTROL_TAG not in r.data.tags]
    swept = swept_keys([r.data.params for r in grid])
    rungs = halving_rungs(parent.data.tags)
    histories = {
        r.info.run_id: {
            m: [p.value for p in sorted(client.get_metric_history(r.info.run_id, m), key=lambda p: p.step)]
            for m in ("loss", "val_loss", "val_accuracy")
        }
        for r in children
    }
    more = more_metrics(children)
    rows = rank([summarize(r, histories[r.info.run_id], swept, rungs, more) for r in grid])
    controls = [control_row(r, histories[r.info.run_id], swept, rungs, more) for r in children if r not in grid]
    table, columns, best, best_is = summary(rows, swept, rungs, more)
    if parent.data.tags.get(runs.TEST_SET_TAG) == "selected":
        best_is = f"{best_is}; {TESTED_ONCE_IS}"
    keys = [k for k in swept if k != SEED]
    every_run, run_cols = rows, run_columns(swept, rungs, more)
    verdict = control_verdict(best, rows, controls, keys)
    if controls:  # after the grid's rows, named in a first column that is blank for the grid
        beside = [{**row, CONTROL: controls[0][CONTROL]} for row in settings(controls, keys)] if SEED in swept else []
        table = [{**row, CONTROL: ""} for row in table] + (beside or controls)
        every_run = [{**row, CONTROL: ""} for row in rows] + controls
        columns, run_cols = [CONTROL, *columns], [CONTROL, *run_cols]

    out.mkdir(parents=True, exist_ok=True)
    also = f" and {len(controls)} control run{'s' if len(controls) > 1 else ''}" if controls else ""
    title = f"# Sweep {parent.info.run_name} ({parent.info.run_id})\n\n{len(rows)} runs{also}"
    after = f"\n{verdict[VERDICT_TAG]}\n" if verdict else ""
    if SEED in swept:  # summary.* has a row per setting, runs.* one per run
        grid_settings = len(table) - (1 if controls else 0)
        head = f"{title} in {grid_settings} settings; {best_is}.\n\n"
        files = write_table(out / "summary", table, columns, head, after)
        runs_are = BEST_OF_HALVING_IS if rungs else BEST_IS
        files += write_table(out / "runs", every_run, run_cols, f"{title}; {runs_are}.\n\n", after)
    else:
        files = write_table(out / "summary", table, columns, f"{title}; {best_is}.\n\n", after)

    best_lr = float(best[LR]) if best else None
    spread = lr_spread(rows, keys) if SEED in swept else None
    beside_grid = control_point(controls)
    lr_figure = plots.lr_effect(lr_series(rows, keys), best_lr, spread, pruned_points(rows, keys), beside_grid)
    lr_figure.savefig(out / "lr_effect.png", dpi=110)
    labels = [curve_label(row, swept) for row in rows] + [f"{r[CONTROL]} ({r['status']})" for r in controls]
    faded = {label for label, row in zip(labels, rows, strict=False) if row["status"] == "PRUNED"}
    labelled = {label: histories[row["run_id"]] for label, row in zip(labels, rows + controls, strict=True)}
    plots.val_curves(labelled, faded, rungs).savefig(out / "val_curves.png", dpi=110)
    files = [out / "lr_effect.png", out / "val_curves.png", *files]
    return Report(
        rows=rows, swept=swept, best=best, files=files, table=table, columns=columns, best_is=best_is,
        controls=controls, verdict=verdict,
    )  # fmt: skip


def control_row(
    run: Run, history: dict[str, list[float]], swept: list[str], rungs: Sequence[int], more: Sequence[str]
) -> Row:
    """A control run's row: as summarize's, with its label ("sweep-free, lr 0.0025") in the CONTROL column."""
    name = run.data.tags[runs.CONTROL_TAG]
    label = f"{CONTROL_NAMES.get(name, name)}, lr {float(run.data.params.get(LR, 'nan')):g}"
    return {CONTROL: label, **summarize(run, history, swept, rungs, more)}


def control_point(controls: list[Row]) -> tuple[str, float, float, float] | None:
    """For plots.lr_effect: the control's label, learning rate and final training and validation loss (means over
    its finished runs), or None without one."""
    if not controls:
        return None
    (train, _), (val, _) = final_losses(controls)
    return controls[0][CONTROL], float(controls[0][LR] or "nan"), train, val


def control_verdict(best: Row | None, rows: list[Row], controls: list[Row], keys: list[str]) -> dict[str, str]:
    """The grid's best against its control, as the parent's tags: the control's validation loss and test accuracy
    (means over its finished runs), by how much the grid's best beat it (grid_gain_*: positive when the grid's best
    is better), what each cost (epochs and seconds of all their runs), and VERDICT_TAG saying it in a sentence."""
    if not controls:
        return {}
    label = controls[0][CONTROL]
    finished = [r for r in controls if r["status"] == "FINISHED" and math.isfinite(r["best_val_loss"])]
    tags = {
        runs.CONTROL_TAG: label,
        "grid_epochs": str(sum(r["epochs"] for r in rows)),
        "control_epochs": str(sum(r["epochs"] for r in controls)),
        "grid_seconds": f"{sum(r['seconds'] for r in rows):.0f}",
        "control_seconds": f"{sum(r['seconds'] for r in controls):.0f}",
    }
    if best is None or not finished:
        missing = "no grid run" if best is None else f"no {label} run"
        return {**tags, VERDICT_TAG: f"No comparison with the {label} control: {missing} finished."}
    control_loss, _ = mean_std([r["best_val_loss"] for r in finished])
    control_accuracy, _ = mean_std([r["test_accuracy"] for r in finished if math.isfinite(r["test_accuracy"])])
    gain = control_loss - best["best_val_loss"]
    tags.update(control_best_val_loss=f"{control_loss:.6g}", grid_gain_val_loss=f"{gain:.6g}")
    accuracy = ""
    if math.isfinite(control_accuracy) and math.isfinite(best["test_accuracy"]):
        tags.update(
            control_test_accuracy=f"{control_accuracy:.6g}",
            grid_gain_test_accuracy=f"{best['test_accuracy'] - control_accuracy:.6g}",
        )
        accuracy = f"; test accuracy {best['test_accuracy']:.2%} against {control_accuracy:.2%}"
    setting = ", ".join(f"{k}={best[k]}" for k in keys)
    means = f" (means over {len(finished)} seeds)" if len(finished) > 1 else ""
    outcome = "beat" if gain > 0 else "lost to" if gain < 0 else "tied with"
    seconds = float(tags["grid_seconds"]) / max(float(tags["control_seconds"]), 1.0)
    tags[VERDICT_TAG] = (
        f"The grid's best ({setting}) {outcome} the {label} control by {abs(gain):.4f} in lowest validation loss "
        f"({best['best_val_loss']:.4f} against {control_loss:.4f}){accuracy}{means}; the grid trained "
        f"{tags['grid_epochs']} epochs in {tags['grid_seconds']} s, the control {tags['control_epochs']} in "
        f"{tags['control_seconds']} s ({seconds:.1f}x the time)."
    )
    return tags


def selected_run_ids(report: Report) -> list[str]:
    """The runs of the best row: the best run, or every finished run of the best setting (its seed replicates)."""
    if report.best is None:
        return []
    if "run_id" in report.best:
        return [report.best["run_id"]]
    keys = [k for k in report.swept if k != SEED]
    return [r["run_id"] for r in report.rows if r["status"] == "FINISHED" and all(r[k] == report.best[k] for k in keys)]


def best_run_id(report: Report) -> str | None:
    """The run of the best row; for a best setting (seed replicates), its run with the lowest best_val_loss."""
    selected = set(selected_run_ids(report))
    same = [r for r in report.rows if r["run_id"] in selected]
    return min(same, key=lambda r: r["best_val_loss"])["run_id"] if same else None


def description(report: Report, folder: Path, registered: str | None = None) -> str:
    """The sweep's answer as Markdown, for its parent run's page: the best setting, the table, where the report is."""
    if report.best is None:
        answer = "**No best setting**: no run finished with a finite validation loss."
    else:
        values = ", ".join(f"{k}={report.best[k]}" for k in report.swept if k in report.best and k != SEED)
        answer = f"**Best: {values}** (best val_loss {report.best['best_val_loss']:.4f})."
    lines = [answer, "", markdown(report.table, report.terminal_columns), f"{report.best_is}.", ""]
    if report.verdict:
        lines += [report.verdict[VERDICT_TAG], ""]
    lines.append(f"Report: `{folder}`; the same files are this run's artifacts (summary.md, lr_effect.png, ...).")
    if registered:
        lines.append(f"The best model is registered as `{registered}` (name/version) in the Model registry.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fashion-sweep-compare", description="Rebuild a sweep's comparison report from the MLflow store."
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: ./mlruns/mlflow.db)")
    parser.add_argument("--sweep", default=None, help="sweep id (= parent run id) or parent run name; default: latest")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default: reports/<sweep id>)")
    args = parser.parse_args(argv)

    uri = credentials.moved_to_environment(args.tracking_uri or store.default_tracking_uri())
    if missing := store.missing_local_store(uri):
        sys.exit(f"fashion-sweep-compare: {missing}; run a sweep first or pass --tracking-uri")
    client = MlflowClient(uri)
    try:
        parent = runs.find_parent(client, args.sweep)
        report = write_report(client, parent, args.out or Path("reports") / parent.info.run_id)
    except (LookupError, MlflowException, OSError) as err:
        reason = credentials.server_refusal(err) or " ".join(str(err).split())
        sys.exit(f"fashion-sweep-compare: {reason} ({store.redacted(uri)})")
    print(markdown(report.table, report.terminal_columns))
    if report.verdict:
        print(report.verdict[VERDICT_TAG])
    print(f"Report of {parent.info.run_name!r} ({parent.info.run_id}) written to {report.files[0].parent}")


if __name__ == "__main__":
    main()
