"""MLflow's private APIs this package uses, each behind one small function (checked on MLflow 3.17.2).

Owns nothing else; tests/test_tracking.py breaks if an MLflow upgrade changes what these rely on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
