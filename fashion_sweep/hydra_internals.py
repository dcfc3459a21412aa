"""Hydra's private APIs this package uses, each behind one small function (checked on hydra-core 1.3.8).

Owns nothing else. tests/test_halving.py (test_jobs_expand_as_the_basic_sweeper_expands_them...) breaks if a
Hydra upgrade changes what these rely on.
"""

from __future__ import annotations

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.types import Override


def basic_sweeper_jobs(overrides: list[Override]) -> list[list[str]]:
    """Every job's overrides, expanded exactly as Hydra's basic sweeper expands them (its static split_arguments:
    the cartesian product of sweep overrides, in its order), so that our sweepers and checks agree with it."""
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, max_batch_size=None) for job in batch]


def command_line_overrides(argv: list[str]) -> list[str]:
    """The overrides of a `fashion-sweep` command line, parsed by Hydra's own argument parser (flags such as
    --multirun and --cfg job left out)."""
    return list(get_args_parser().parse_known_args(argv)[0].overrides)
