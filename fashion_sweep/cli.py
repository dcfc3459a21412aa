"""The `fashion-sweep` console script: a Hydra app over conf/config.yaml that trains one run per job.

Owns what the shell sees: checks before work, one-line errors, exit codes, Ctrl-C and SIGTERM. TensorFlow and
MLflow are imported only once a job runs, so `--help` and `--cfg job` answer at once.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig


class JobFailed(CompactHydraException):
    """A job crashed; Hydra prints this one line (the traceback is in the run's traceback.txt)."""


@hydra.main(version_base="1.3", config_path="pkg://fashion_sweep.conf", config_name="config")
def app(cfg: DictConfig) -> float:
    from fashion_sweep import backend, config, data

    hydra_cfg = HydraConfig.get()
    single = hydra_cfg.mode == RunMode.RUN  # a --multirun checked every job, its data and store before the first
    if single:  # keys, ranges, data and store first: refused before TensorFlow's ~5 s import
        config.validate(cfg, hydra_cfg.runtime.choices, build=False)
        data.start_decoding(config.check_data_and_store(cfg))  # decoded while TensorFlow is imported
    backend.import_tensorflow()
    from fashion_sweep import runs

    if single:
        config.check_builds(cfg)
    elif cfg.task == "lr_find":  # a sweep job that sweep.check_jobs could not see coming (e.g. a user's preset)
        raise config.ConfigError("an LR range test is one run; drop --multirun")
    try:
        if cfg.task == "lr_find":
            from fashion_sweep.lr_find import lr_find

            return lr_find(cfg)
        from fashion_sweep.train import train

        return train(cfg)
    except Exception as err:
        raise JobFailed(runs.error_summary(err)) from None  # the traceback is in the run's traceback.txt


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run as KILLED, like Ctrl-C


def interrupted_message() -> str:
    runs = sys.modules.get("fashion_sweep.runs")  # imported only if a job got that far
    run_id = getattr(runs, "last_run_id", None)
    if run_id is None:
        return "fashion-sweep: interrupted before any run started"
    if "fashion_sweep.lr_find" in sys.modules:  # an LR range test is short and not resumed
        return f"fashion-sweep: interrupted; LR range test run {run_id} is marked KILLED in MLflow (run it again)"
    return f"fashion-sweep: interrupted; run {run_id} is marked KILLED in MLflow (fashion-sweep-resume continues it)"


def register_plugins() -> None:
    """Make `hydra/sweeper=halving` known to Hydra. A wheel install needs nothing (Hydra's scan of hydra_plugins
    finds it), but an editable install (setuptools >= 64 path hook) hides it from that scan (pkgutil)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.fashion_sweep_halving.halving_sweeper import HalvingSweeper

    Plugins.instance().register(HalvingSweeper)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    register_plugins()
    try:
        app()
    except KeyboardInterrupt:
        print(interrupted_message(), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
