"""A sweep's parent run: every write to it, from its opening to its report and its end.

Owns what the parent records (docs/records.md): its launch record, the plan and progress line, a halving sweep's
rungs and pruned children, the report's files and best values, its final status. The sweep callback (sweep.py),
the halving sweeper (halving.py) and each job's progress callback write through it. Imports no TensorFlow.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities import Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fashion_sweep import progress, runs

log = logging.getLogger(__name__)

FIGURES = ("confusion_matrix.png", "misclassified.png")  # a scored run's test figures, copied to its sweep's parent


def open_new(client: MlflowClient, experiment_id: str, name: str, sweep_yaml: str) -> str:
    """A new parent run named name (made unique in its experiment), with the sweep's overrides and sweeper
    settings as sweep.yaml; returns its id."""
    run_id = client.create_run(experiment_id, run_name=name, tags={runs.SWEEP_ROLE_TAG: "parent"}).info.run_id
    if (unique := unique_name(client, experiment_id, run_id, name)) != name:
        client.update_run(run_id, name=unique)
    client.log_text(run_id, sweep_yaml, "sweep.yaml")
    return run_id


def unique_name(client: MlflowClient, experiment_id: str, run_id: str, name: str) -> str:
    """name, or "name #k" when k - 1 sweeps of that name were opened before this one (two sweeps started in the
    same second). Called after the run exists, so that sweeps opened at the same moment agree on their order."""
    query = f"tags.{runs.SWEEP_ROLE_TAG} = 'parent' and attributes.run_name = '{name}'"
    same = client.search_runs([experiment_id], query, max_results=1000)
    order = sorted(same, key=lambda run: (run.info.start_time, run.info.run_id))
    position = next(i for i, run in enumerate(order) if run.info.run_id == run_id)
    return f"{name} #{position + 1}" if position else name


def reopen(client: MlflowClient, run_id: str) -> None:
    """A sweep that fashion-sweep-resume continues runs again in its old parent run."""
    client.update_run(run_id, status="RUNNING")


def record_start(client: MlflowClient, run_id: str, launch: str, plan: progress.Plan, test_set: str) -> None:
    """What a (re)started sweep records before its first job: how to launch it again, its plan, who runs it, who
    meets the test set (tracking.test_set; a resumed sweep keeps what it began with).

    `progress` exists before any job runs, so jobs only update it: two jobs creating it at once (joblib) made one
    of them fail on SQLite's unique (key, run) constraint (mlflow 3.17).
    """
    tags = {runs.SWEEP_ID_TAG: run_id, runs.LAUNCH_TAG: launch, progress.PLAN_TAG: plan.to_json(),
            progress.PROGRESS_TAG: "starting", runs.NOTE_TAG: running_note("starting"),
            **runs.process_tags()}  # fmt: skip
    tags[runs.TEST_SET_TAG] = client.get_run(run_id).data.tags.get(runs.TEST_SET_TAG, test_set)
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def record_plan(client: MlflowClient, run_id: str, plan: progress.Plan) -> None:
    client.set_tag(run_id, progress.PLAN_TAG, plan.to_json())


def running_note(line: str) -> str:
    """The parent run's description while the sweep runs."""
    return f"**Sweep running**: {line}\n\nThe table and the best setting appear here when the sweep ends."


def record_progress(client: MlflowClient, run_id: str, line: str) -> None:
    """The progress line a job logs after each epoch, mirrored where the MLflow UI shows it (tag `progress` and the
    run's description), in one request; never fails the job."""
    try:
        tags = [RunTag(progress.PROGRESS_TAG, line), RunTag(runs.NOTE_TAG, running_note(line))]
        client.log_batch(run_id, tags=tags)
    except MlflowException as err:
        log.warning("progress not mirrored on the sweep's parent run: %s", str(err).splitlines()[0])


def record_rungs(client: MlflowClient, run_id: str, schedule: list[int]) -> None:
    client.set_tag(run_id, runs.HALVING_RUNGS_TAG, ",".join(map(str, schedule)))


def prune(client: MlflowClient, run_id: str, jobs: list[list[str]], epoch: int) -> None:
    """Mark the runs of these jobs pruned at epoch; a run paused at the rung (SCHEDULED) ends FINISHED."""
    experiment_id = client.get_run(run_id).info.experiment_id
    for overrides in jobs:
        run = runs.job_run(client, experiment_id, run_id, runs.job_key(overrides))
        if run is None:
            continue
        note = f"Pruned at epoch {epoch}: not among the best at this rung of the halving sweep."
        tags = {runs.PRUNED_TAG: "true", runs.PRUNED_AT_TAG: str(epoch), runs.NOTE_TAG: note}
        client.log_batch(run.info.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        if run.info.status == "SCHEDULED":
            client.set_terminated(run.info.run_id, "FINISHED")
        log.info("Pruned at epoch %d: %s", epoch, " ".join(overrides))


def end_orphans(client: MlflowClient, run_id: str) -> None:
    """Jobs still RUNNING when their sweep ends lost their process: they end KILLED (resume continues them)."""
    parent = client.get_run(run_id)
    for child in runs.child_runs(client, parent.info.experiment_id, run_id):
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "KILLED")


def record_report(client: MlflowClient, run_id: str, files: list[Path], best: dict[str, Any] | None, lr_key: str):
    """The report's files as artifacts, and the best setting's learning rate, val_loss and test accuracy."""
    for path in files:
        client.log_artifact(run_id, str(path))
    if best is None:
        return
    if "best_lr" not in client.get_run(run_id).data.params:  # a param is written once; a resume may differ
        client.log_param(run_id, "best_lr", best[lr_key])
    client.log_metric(run_id, "best_lr", float(best[lr_key]))
    client.log_metric(run_id, "best_val_loss", best["best_val_loss"])
    if math.isfinite(best["test_accuracy"]):  # not with tracking.test_set=none
        client.log_metric(run_id, "best_test_accuracy", best["test_accuracy"])


def record_test(client: MlflowClient, run_id: str, selected: list[Run], figures_from: str | None) -> None:
    """The test scores of the sweep's selected runs on the parent: test_accuracy and test_loss (means over its seed
    replicates, if several) and the confusion matrix and misclassified images of figures_from (the best of them)."""
    scored = [run for run in selected if "test_accuracy" in run.data.metrics]
    if not scored:
        return
    for name in ("test_accuracy", "test_loss"):
        values = [run.data.metrics[name] for run in scored if name in run.data.metrics]
        if values:
            client.log_metric(run_id, name, statistics.mean(values))
    if figures_from is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        for name in FIGURES:
            try:
                path = client.download_artifacts(figures_from, name, folder)
            except (MlflowException, OSError):
                continue  # a run scored by an older fashion-sweep without this figure
            client.log_artifact(run_id, path)


def record_control(client: MlflowClient, run_id: str, verdict: dict[str, str]) -> None:
    """The grid's best against the sweep's control (compare.control_verdict), as the parent's tags."""
    for key, value in verdict.items():
        client.set_tag(run_id, key, value)


def record_description(client: MlflowClient, run_id: str, markdown: str) -> None:
    """The sweep's answer as the parent run's description (Markdown on its page in the MLflow UI)."""
    client.set_tag(run_id, runs.NOTE_TAG, markdown)


def finish(client: MlflowClient, run_id: str, status: str, elapsed_seconds: float) -> None:
    """End the parent run with status, its progress line saying so."""
    client.set_tag(run_id, progress.PROGRESS_TAG, f"{status.lower()} after {progress.minutes(elapsed_seconds)}")
    client.set_terminated(run_id, status)
