"""The `fashion-sweep` console script: a Hydra app over conf/config.yaml that trains one run per job.

Owns what the shell sees: config checks before work, one-line errors, exit codes, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from fashion_sweep.config import validate
from fashion_sweep.data import DataError
from fashion_sweep.tracking import error_summary
from fashion_sweep.train import train


class JobFailed(CompactHydraException):
    """A job crashed; Hydra prints this one line (the traceback is in the run's traceback.txt)."""


@hydra.main(version_base="1.3", config_path="pkg://fashion_sweep.conf", config_name="config")
def app(cfg: DictConfig) -> float:
    validate(cfg)
    try:
        return train(cfg)
    except DataError as err:
        raise JobFailed(str(err)) from None
    except Exception as err:
        raise JobFailed(error_summary(err)) from None  # the traceback is in the run's traceback.txt


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run as KILLED, like Ctrl-C


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except KeyboardInterrupt:
        print("fashion-sweep: interrupted; the run is marked KILLED in MLflow", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
