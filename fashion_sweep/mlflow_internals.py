"""MLflow's private APIs this package uses, each behind one small function (checked on MLflow 3.17.2).

Owns nothing else; tests/test_tracking.py breaks if an MLflow upgrade changes what these rely on (or fixes what
they work around).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlflow.utils import requirements_utils


@contextmanager
def requirements_checked_by_name() -> Iterator[None]:
    """While inside, mlflow checks a model's pip requirements against this environment without first mapping
    every installed package's modules (importlib.metadata.packages_distributions(): ~0.3 s once per process on
    an AMD EPYC). mlflow 3.17 builds that map before the check although it looks each requirement up by its
    distribution name first, which finds ours (tensorflow, keras, mlflow); requirements_utils has no public switch."""
    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", {}) is not None:  # built already (or mlflow changed)
        yield
        return
    requirements_utils._MODULES_TO_PACKAGES = {}  # type: ignore[assignment]  # mlflow declares it None until built
    try:
        yield
    finally:
        requirements_utils._MODULES_TO_PACKAGES = None  # a later requirement inference builds the real map


@contextmanager
def keras_model_folder_made_first() -> Iterator[None]:
    """While inside, mlflow.keras.save_model creates the model's folder before it writes the input example into it.
    mlflow 3.17's Keras flavour writes input_example.json first and fails with FileNotFoundError whenever an input
    example is given (mlflow/mlflow#16183, open); Model.log looks the flavour's save_model up on mlflow.keras."""
    flavour = importlib.import_module("mlflow.keras")  # the module itself, not mlflow's lazy loader of it
    original = flavour.save_model

    def save_model(model: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        os.makedirs(path, exist_ok=True)
        return original(model, path, *args, **kwargs)

    setattr(flavour, "save_model", save_model)  # noqa: B010
    try:
        yield
    finally:
        setattr(flavour, "save_model", original)  # noqa: B010
