"""Checks a composed config before anything runs: one message naming the key, the value and what is allowed.

Owns the rules Hydra's composition cannot express (ranges, positive numbers); it reads, never changes, the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from fashion_sweep.models import BUILDERS
from fashion_sweep.optimizers import OPTIMIZERS


class ConfigError(CompactHydraException):
    """A config value is out of range; Hydra prints the message alone, without a stack trace."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("model.name", lambda v: v in BUILDERS, f"one of {sorted(BUILDERS)}"),
    ("optimizer.name", lambda v: v in OPTIMIZERS, f"one of {sorted(OPTIMIZERS)}"),
    ("optimizer.lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("trainer.epochs", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("trainer.batch_size", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("trainer.eval_batch_size", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("trainer.seed", _whole, "a whole number"),
    ("trainer.diverge_loss", lambda v: _number(v) and v > 0, "a number > 0"),
    ("data.val_fraction", lambda v: _number(v) and 0 < v < 1, "a number between 0 and 1"),
    ("data.train_size", lambda v: v is None or (_whole(v) and 100 <= v <= 60000), "null or 100..60000"),
]


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first key that breaks its rule."""
    for key, ok, allowed in RULES:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")
