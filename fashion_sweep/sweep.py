"""Groups the jobs of a Hydra --multirun under one parent MLflow run, and closes it with the report.

Owns the parent run's life (open at the start, always ended); the report itself is compare.py's.
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fashion_sweep import compare, tracking
from fashion_sweep.train import PARENT_RUN_ENV

log = logging.getLogger(__name__)


class MlflowSweep(Callback):
    """Hydra callback: opens the parent run before any job and ends it, with the report, after the last.

    Jobs find the parent through the environment variable PARENT_RUN_ENV, which joblib's worker processes
    inherit. In hydra-core 1.3.8 a failed job makes the sweeper re-raise and on_multirun_end is never
    called, so the parent is also closed at interpreter exit.
    """

    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.uri = ""
        self.report_dir = Path()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.open_parent(config)
        except Exception as err:  # Hydra would only warn and run the jobs ungrouped
            raise SystemExit(f"fashion-sweep: cannot open the sweep's parent MLflow run: {err}") from None

    def open_parent(self, config: DictConfig) -> None:
        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)
        # Create the store and experiment once, here: joblib workers meeting a new SQLite store race on its tables.
        experiment_id = tracking.connect(config.tracking)
        self.uri = str(config.tracking.uri)
        self.report_dir = Path(str(config.hydra.sweep.dir)).absolute() / "report"
        client = MlflowClient(self.uri)
        name = f"{config.sweep_name} {datetime.now():%Y-%m-%d %H:%M:%S}"
        run = client.create_run(experiment_id, run_name=name, tags={"sweep_role": "parent"})
        self.parent_run_id = run.info.run_id
        client.set_tag(self.parent_run_id, "sweep_id", self.parent_run_id)
        params = config.hydra.sweeper.get("params")
        sweep = {"overrides": list(config.hydra.overrides.task), "sweeper_params": params or {}}
        client.log_text(self.parent_run_id, OmegaConf.to_yaml(sweep), "sweep.yaml")
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        atexit.register(self.finish, completed=False)
        log.info("Sweep %r: parent MLflow run %s", name, self.parent_run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.finish(completed=True)

    def finish(self, completed: bool) -> None:
        """Write the report to the parent run and end it: FINISHED, or FAILED/KILLED if a job crashed or stopped."""
        if self.parent_run_id is None:
            return
        run_id, self.parent_run_id = self.parent_run_id, None
        atexit.unregister(self.finish)
        os.environ.pop(PARENT_RUN_ENV, None)
        client = MlflowClient(self.uri)
        statuses: list[str] = []
        try:
            for child in compare.child_runs(client, client.get_run(run_id)):
                if child.info.status == "RUNNING":  # its process died before it could end the run
                    client.set_terminated(child.info.run_id, "KILLED")
            report = compare.write_report(client, client.get_run(run_id), self.report_dir)
            statuses = [row["status"] for row in report.rows]
            for path in report.files:
                client.log_artifact(run_id, str(path))
            if report.best is not None:
                client.log_param(run_id, "best_lr", report.best[compare.LR])
                client.log_metric(run_id, "best_lr", float(report.best[compare.LR]))
                client.log_metric(run_id, "best_val_loss", report.best["best_val_loss"])
                client.log_metric(run_id, "best_test_accuracy", report.best["test_accuracy"])
            print(compare.markdown(report.rows, [*report.swept, *compare.TERMINAL_COLUMNS]))
            print(f"{compare.BEST_IS}.\nReport: {self.report_dir}  (also on MLflow run {run_id})")
            print("Browse the runs: fashion-sweep-ui   (MLflow UI on http://127.0.0.1:5000)")
        finally:
            client.set_terminated(run_id, sweep_status(statuses, completed))


def sweep_status(child_statuses: list[str], completed: bool) -> str:
    """FINISHED if every job ran (diverged counts as ran); KILLED if one was stopped; FAILED otherwise."""
    if "KILLED" in child_statuses:
        return "KILLED"
    if completed and "FAILED" not in child_statuses:
        return "FINISHED"
    return "FAILED"
