"""Groups the jobs of a Hydra --multirun under one parent MLflow run, and closes it with the report.

Owns the parent run's life (checked, opened before the first job, always ended); the report is compare.py's.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from fashion_sweep import backend, cli, compare, control, credentials, data, halving, parent, progress, registry, runs
from fashion_sweep.config import ConfigError, check_builds, check_data_and_store, check_no_secret, validate

log = logging.getLogger(__name__)


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The overrides of each job of this multirun, expanded as Hydra's basic sweeper (and ours) will expand them."""
    return halving.expand(config.hydra.sweeper.get("params"), list(config.hydra.overrides.task))


def check_sweeper(config: DictConfig, jobs: list[list[str]]) -> None:
    """The halving sweeper's own settings (hydra/sweeper=halving), before any job runs."""
    sweeper = config.hydra.sweeper
    if str(sweeper.get("_target_", "")).endswith(".HalvingSweeper"):
        try:
            halving.check_plan(jobs, sweeper.eta, sweeper.min_epochs, config.trainer.epochs)
        except ValueError as err:
            raise SystemExit(f"fashion-sweep: {err}; nothing was run") from None


def check_jobs(config: DictConfig, controls: list[list[str]]) -> list[int]:
    """Check every job before any runs (its config, and once each its data and store), so a bad value in the
    5th job wastes no training and leaves nothing in the store; what needs no TensorFlow goes first, for all
    jobs, so that a typo or a wrong folder is refused before TensorFlow is imported. The control's jobs (controls)
    are checked as the grid's. Returns each job's trainer.epochs, the controls' last."""
    jobs = job_overrides(config)
    given = {o.lstrip("+") for job in jobs for o in job}  # e.g. task=train,lr_find; cli.app refuses the rest
    if config.get("task") == "lr_find" or given & {"experiment=lr_find", "task=lr_find"}:
        raise SystemExit("fashion-sweep: an LR range test is one run; drop --multirun")
    check_sweeper(config, jobs)
    shared = set.intersection(*map(set, jobs)) if len(jobs) > 1 else set()
    in_process = str(config.hydra.launcher._target_).endswith(".BasicLauncher")  # not joblib's or Ray's workers
    composed, checked = [], set()
    for overrides in jobs + controls:  # keys and ranges of every job, and once each data and store setting
        try:
            job = compose(config_name=config.hydra.job.config_name, overrides=overrides, return_hydra_config=True)
            with open_dict(job):
                choices = job.hydra.runtime.choices
                del job["hydra"]
            validate(job, choices, build=False)
            launch = str({group: OmegaConf.to_container(job[group], resolve=True) for group in ("data", "tracking")})
            if launch not in checked:
                folder = check_data_and_store(job)
                if in_process:  # the jobs run here: decoded while TensorFlow is imported
                    data.start_decoding(folder)
                checked.add(launch)
        except Exception as err:
            raise refusal(overrides, shared, err) from None
        composed.append((overrides, job))
    backend.import_tensorflow()  # before the builds import it, so that its start-up noise is filtered
    for overrides, job in composed:  # then each job's model and optimizer are built once (TensorFlow)
        try:
            check_builds(job)
        except Exception as err:
            raise refusal(overrides, shared, err) from None
    return [int(job.trainer.epochs) for _, job in composed]


def refusal(overrides: list[str], shared: set[str], err: Exception) -> SystemExit:
    """The one-line exit for a refused job, naming it by what it sweeps (not the overrides all jobs share)."""
    swept = [o for o in overrides if o not in shared] or overrides
    return SystemExit(f"fashion-sweep: job {swept} refused, nothing was run: {cli.refusal(err, overrides)}")


class MlflowSweep(Callback):
    """Hydra callback: opens the parent run before any job (or reopens it, when fashion-sweep-resume continues a
    sweep) and ends it, with the report, after the last.

    Jobs find the parent through the environment variable runs.PARENT_RUN_ENV, set for each by its own
    config (hydra.job.env_set), so that joblib's and Ray's workers get it too. In hydra-core 1.3.8 a failed job
    makes the sweeper re-raise and on_multirun_end is never called, so the parent is also closed at interpreter
    exit: KILLED if Ctrl-C or SIGTERM stopped the sweep.
    """

    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.uri = ""
        self.report_dir = Path()
        self.interrupted = False
        self.registered_model: str | None = None  # tracking.registered_model: where the best model is registered
        self.test_set = "selected"  # tracking.test_set: who meets the test set
        self.controls: list[list[str]] = []  # the overrides of the control's jobs (control=sweep_free), run last
        self.grid_size = 0  # the grid's jobs: the controls are numbered after them

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run: a secret in its config is refused before Hydra writes it to .hydra/ (the job checks the
        rest; a --multirun's jobs are all checked in on_multirun_start)."""
        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)
        job = config.copy()
        with open_dict(job):
            del job["hydra"]
        try:
            check_no_secret(job)
        except ConfigError as err:
            raise SystemExit(f"fashion-sweep: {err}") from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)
        grid = job_overrides(config)
        self.controls, self.grid_size = control.jobs(config, grid), len(grid)
        job_epochs = check_jobs(config, self.controls)
        try:
            self.open_parent(config, progress.grid_plan(job_epochs, time.time()))
        except Exception as err:  # Hydra would only warn, and run the jobs ungrouped; atexit ends the parent
            reason = credentials.server_refusal(err) or runs.error_summary(err)
            raise SystemExit(f"fashion-sweep: cannot open the sweep's parent MLflow run: {reason}") from None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.interrupt)

    def interrupt(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True  # so that a stop between two jobs, when no job is KILLED, still ends the parent KILLED
        cli.stop_on(signum, frame)

    def open_parent(self, config: DictConfig, plan: progress.Plan) -> None:
        # Create the store and experiment once, here: joblib workers meeting a new SQLite store race on its tables.
        experiment_id = runs.connect(config.tracking)
        self.uri = str(config.tracking.uri)
        self.registered_model = config.tracking.get("registered_model")
        self.test_set = str(config.tracking.get("test_set", "selected"))
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        self.report_dir = sweep_dir / "report"
        client = MlflowClient(self.uri)
        overrides = config.hydra.overrides
        if resumed := os.environ.pop(runs.RESUME_SWEEP_ENV, None):
            parent.reopen(client, resumed)
            self.parent_run_id = resumed
        else:
            name = f"{config.sweep_name} {datetime.now():%Y-%m-%d %H:%M:%S}"
            sweep = {"overrides": list(overrides.task), "sweeper_params": config.hydra.sweeper.get("params") or {}}
            self.parent_run_id = parent.open_new(client, experiment_id, name, OmegaConf.to_yaml(sweep))
        atexit.register(self.finish, completed=False)
        launch = runs.launch_record(config.hydra.runtime.cwd, overrides.task, overrides.hydra, sweep_dir=str(sweep_dir))
        parent.record_start(client, self.parent_run_id, launch, plan, self.test_set)
        os.environ[runs.PARENT_RUN_ENV] = self.parent_run_id  # for this process (the halving sweeper)
        # Every job gets it through its own config, whichever launcher runs it: load_sweep_config composes each
        # job from these Hydra overrides (hydra-core 1.3.8), and Ray's workers do not inherit this environment.
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"++hydra.job.env_set.{runs.PARENT_RUN_ENV}={self.parent_run_id}")
        verb = "continues" if resumed else "is"
        log.info("Sweep %s parent MLflow run %s", verb, self.parent_run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        completed = True
        if self.controls and not self.interrupted:
            try:
                control.run(config, self.controls, first_number=self.grid_size)
            except Exception as err:  # the sweep ends FAILED (a resume runs the control again); Hydra would only warn
                print(f"fashion-sweep: the control run failed: {runs.error_summary(err)}", file=sys.stderr)
                completed = False
        if not self.finish(completed=completed) or not completed:
            raise SystemExit(1)  # Hydra only warns about a callback's exceptions; the exit code must say it

    def finish(self, completed: bool) -> bool:
        """End jobs whose process died, write the report to the parent run (and its description), register the
        best model of a finished sweep, print the answer, and end the parent: FINISHED, or FAILED/KILLED if a job
        crashed or stopped. Returns False if the report could not be written (the parent then ends FAILED)."""
        if self.parent_run_id is None:
            return True
        run_id, self.parent_run_id = self.parent_run_id, None
        atexit.unregister(self.finish)
        os.environ.pop(runs.PARENT_RUN_ENV, None)
        client = MlflowClient(self.uri)
        status = "FAILED"
        try:
            parent.end_orphans(client, run_id)
            parent_run = client.get_run(run_id)
            report = compare.write_report(client, parent_run, self.report_dir)
            statuses = [row["status"] for row in report.rows + report.controls]
            ended = sweep_status(statuses, completed, self.interrupted)
            if ended == "FINISHED":  # stopped while scoring, the sweep stays unfinished: a resume scores it
                report = self.score_selected(client, parent_run, report)
            status = ended
            version = self.register_best(client, parent_run, report) if status == "FINISHED" else None
            page = runs.ui_address(runs.ui_base(self.uri), parent_run.info.experiment_id, run_id)
            parent.record_report(client, run_id, report.files, report.best, compare.LR)
            parent.record_control(client, run_id, report.verdict)
            parent.record_description(client, run_id, compare.description(report, self.report_dir, version))
            self.print_report(report, run_id, page)
            if status != "FINISHED":
                print(f"Continue this sweep with: fashion-sweep-resume {run_id}")
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception as err:
            print(f"fashion-sweep: the sweep's report could not be written: {err}", file=sys.stderr)
            return False
        finally:
            parent.finish(client, run_id, status, time.time() - client.get_run(run_id).info.start_time / 1000)
        return True

    def score_selected(self, client: MlflowClient, parent_run: Run, report: compare.Report) -> compare.Report:
        """Once the sweep has chosen on validation: score its selected runs on the test set if their jobs left that
        to it (tracking.test_set=selected; once: a resumed sweep scores only what is missing), record their scores
        on the parent, and return the report, rewritten if anything was scored."""
        selected = [client.get_run(run_id) for run_id in compare.selected_run_ids(report)]
        unscored = [run for run in selected if "test_accuracy" not in run.data.metrics]
        if unscored and self.test_set == "selected":
            from fashion_sweep import scoring  # TensorFlow: imported only when there is something to score

            for run in unscored:
                scores = scoring.score_run(client, run)
                log.info(
                    "Test set scored once, for the selected run %s: accuracy %.4f", run.info.run_id, scores.accuracy
                )
            report = compare.write_report(client, parent_run, self.report_dir)
            selected = [client.get_run(run_id) for run_id in compare.selected_run_ids(report)]
        parent.record_test(client, parent_run.info.run_id, selected, compare.best_run_id(report))
        return report

    def register_best(self, client: MlflowClient, parent_run: Run, report: compare.Report) -> str | None:
        """The best run's model as a new version of tracking.registered_model ("<name>/<version>"), if set."""
        run_id = compare.best_run_id(report)
        if not self.registered_model or run_id is None:
            return None
        best = client.get_run(run_id)
        swept = {key: best.data.params.get(key, "") for key in report.swept}
        score = {"best_val_loss": f"{report.best['best_val_loss']:.6g}" if report.best else ""}
        tags = {runs.SWEEP_ID_TAG: parent_run.info.run_id, "sweep": parent_run.info.run_name, **swept, **score}
        version = registry.register(client, self.registered_model, best, tags)
        if version is None:
            return None
        client.set_tag(parent_run.info.run_id, registry.VERSION_TAG, f"{version.name}/{version.version}")
        return f"{version.name}/{version.version}"

    def print_report(self, report: compare.Report, run_id: str, page: str) -> None:
        """The table, how best was chosen, where the report is, where to browse."""
        print(compare.markdown(report.table, report.terminal_columns))
        if report.verdict:
            print(report.verdict[compare.VERDICT_TAG])
        print(f"{report.best_is}.\nReport: {self.report_dir}  (also on MLflow run {run_id})")
        if self.uri.startswith(("http://", "https://")):  # the server is the UI
            print(f"Browse the sweep: {page}")
        else:
            ui = Path(sys.executable).parent / "fashion-sweep-ui"  # next to this Python, e.g. .venv/bin/
            print(f"Browse the sweep: {ui} --tracking-uri {self.uri}   then open {page}")


def sweep_status(child_statuses: list[str], completed: bool, interrupted: bool = False) -> str:
    """FINISHED if every job ran (diverged counts as ran); KILLED if one was stopped or the sweep was interrupted;
    FAILED otherwise."""
    if interrupted or "KILLED" in child_statuses:
        return "KILLED"
    if completed and "FAILED" not in child_statuses:
        return "FINISHED"
    return "FAILED"
