"""The `fashion-sweep` console script: a Hydra app over conf/config.yaml that trains one run per job.

Owns what the shell sees: checks before work, one-line errors, exit codes, Ctrl-C and SIGTERM. TensorFlow and
MLflow are imported only once a job runs, so `--help` and `--cfg job` answer at once.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import sys
from types import FrameType

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, ConfigCompositionException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig


class JobFailed(CompactHydraException):
    """A job of a --multirun crashed; Hydra prints this line (the traceback is in the run's traceback.txt)."""


@hydra.main(version_base="1.3", config_path="pkg://fashion_sweep.conf", config_name="config")
def app(cfg: DictConfig) -> float:
    """Hydra's task function: one job. A single run's error ends the process with one line (SystemExit passes
    through Hydra's job runner, which would add its own lines); a sweep's job fails as JobFailed."""
    from fashion_sweep import config

    single = HydraConfig.get().mode == RunMode.RUN  # a --multirun checked every job, its data and store first
    try:
        return job(cfg, single)
    except Exception as err:
        from fashion_sweep import credentials

        if isinstance(err, config.ConfigError):
            summary = str(err)
        elif refused := credentials.server_refusal(err):  # a server's 401 or 403: no run was created
            summary = f"tracking.uri={cfg.tracking.uri}: {refused}"
        else:
            from fashion_sweep import runs

            summary = runs.error_summary(err)  # the traceback is in the run's traceback.txt
        if single:
            raise SystemExit(f"fashion-sweep: {summary}") from None
        raise JobFailed(summary) from None


def job(cfg: DictConfig, single: bool) -> float:
    """Check what a single run needs (keys, ranges, data and store before TensorFlow's ~5 s import), then train
    or run the LR range test."""
    from fashion_sweep import backend, config, data

    if single:
        config.validate(cfg, HydraConfig.get().runtime.choices, build=False)
        data.start_decoding(config.check_data_and_store(cfg))  # decoded while TensorFlow is imported
    backend.import_tensorflow()
    if single:
        config.check_builds(cfg)
    elif cfg.task == "lr_find":  # a sweep job that sweep.check_jobs could not see coming (e.g. a user's preset)
        raise config.ConfigError("an LR range test is one run; drop --multirun")
    if cfg.task == "lr_find":
        from fashion_sweep.lr_find import lr_find

        return lr_find(cfg)
    from fashion_sweep.train import train

    return train(cfg)


def refusal(err: Exception, argv: list[str]) -> str:
    """One line for what Hydra refused before any job ran: an option a group lacks, a key no config has."""
    from fashion_sweep import config

    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(option, err.options, n=1)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return f"{group}={option} is not an option of {group} (its options: {', '.join(err.options)}){hint}"
    if isinstance(err, ConfigCompositionException) and (key := re.match(r"Could not override '([^']+)'", str(err))):
        try:
            return str(config.unknown_key(key.group(1), choices_without(key.group(1), argv)))
        except Exception:  # the rest of the command line does not compose either: Hydra's own words
            pass
    return " ".join(str(err).split("\n", 1)[0].split())


def choices_without(key: str, argv: list[str]) -> dict[str, str]:
    """The config groups' chosen options for the command line (its first job) without the overrides of key."""
    from hydra import compose, initialize_config_module

    from fashion_sweep import halving, hydra_internals

    overrides = [o for o in hydra_internals.command_line_overrides(argv) if o.lstrip("+~").split("=")[0] != key]
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        first_job = halving.expand(None, overrides)[0]
        return dict(compose("config", overrides=first_job, return_hydra_config=True).hydra.runtime.choices)


class Terminated(KeyboardInterrupt):
    """SIGTERM: ends the run as KILLED, like Ctrl-C, and the process with 143 (128 + SIGTERM), as the shell's."""


def stop_on(signum: int, frame: FrameType | None) -> None:
    """The signal handler of a run or sweep: Ctrl-C and SIGTERM unwind it, so that every run ends KILLED."""
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


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
    signal.signal(signal.SIGTERM, stop_on)
    register_plugins()
    traceback_asked = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # hydra-core 1.3.8 prints an error as a frame of lines unless HYDRA_FULL_ERROR=1, when it raises it to us.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except KeyboardInterrupt as stop:
        print(interrupted_message(), file=sys.stderr)
        sys.exit(143 if isinstance(stop, Terminated) else 130)
    except Exception as err:
        if traceback_asked:
            raise
        sys.exit(f"fashion-sweep: {refusal(err, sys.argv[1:])}")


if __name__ == "__main__":
    main()
