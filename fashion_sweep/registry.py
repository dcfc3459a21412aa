"""The model registry: a sweep's best model (or, when asked, a single run's) as a new version of a registered model.

Owns which models exist in the registry and what a version records: the run it came from (MLflow links it), the
sweep's parent run, the swept values and the score. It reads the store and imports no TensorFlow.
"""

from __future__ import annotations

import logging
import warnings

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

VERSION_TAG = "registered_model_version"  # "<name>/<version>", on the run (and a sweep's parent) registered


def logged_model_id(client: MlflowClient, run: Run) -> str | None:
    """The id of the model a run logged (tracking.log_model), or None if it logged none."""
    query = f"source_run_id = '{run.info.run_id}'"
    models = client.search_logged_models([run.info.experiment_id], filter_string=query, max_results=1)
    return models[0].model_id if models else None


def register(client: MlflowClient, name: str, run: Run, tags: dict[str, str]) -> ModelVersion | None:
    """Register run's logged model as a new version of the registered model name, with tags; None (and a log line)
    when the run logged no model (tracking.log_model=false)."""
    model_id = logged_model_id(client, run)
    if model_id is None:
        log.warning("Run %s logged no model (tracking.log_model=false): nothing registered", run.info.run_id)
        return None
    with warnings.catch_warnings():  # mlflow 3.17 warns that model registry stages are deprecated
        warnings.simplefilter("ignore", FutureWarning)
        version = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
    client.set_tag(run.info.run_id, VERSION_TAG, f"{name}/{version.version}")
    log.info("Registered model %s version %s (run %s)", name, version.version, run.info.run_id)
    return version
