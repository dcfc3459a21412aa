"""Checks a composed config before anything runs: one message naming the key, the value and what is allowed.

Owns the rules Hydra's composition cannot express: every group's keys are the keys of its option's YAML (a
closed schema), numbers are finite and in range, the model and optimizer build. It reads, never changes, the
config.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from fashion_sweep import credentials

SCHEDULES = ("constant", "cosine", "one_cycle")  # optimizers.learning_rate
AUGMENTS = ("none", "flip_shift")  # pipeline.training_batches
PRECISIONS = ("auto", "float32", "bfloat16")  # backend.choose_precision
TEST_SETS = ("selected", "all", "none")  # scoring.scored_in_job: who meets the test set
TASKS = ("train", "lr_find")  # what a job does: train.train or lr_find.lr_find (cli.py)
GROUPS = ("data", "model", "optimizer", "trainer", "tracking", "lr_find", "control")  # options: plain YAML schemas


class ConfigError(CompactHydraException):
    """A config value is out of range; Hydra prints the message alone, without a stack trace."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rate(value: Any) -> bool:
    return _number(value) and 0 <= value < 1


def _sizes(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_whole(v) and v >= 1 for v in value)


@functools.cache
def shipped_names(group: str) -> list[str]:
    """The `name` of every option of conf/<group> as shipped: the keys of models.BUILDERS or
    optimizers.OPTIMIZERS, read from the YAML so that checking them needs no Keras."""
    folder = resources.files("fashion_sweep.conf").joinpath(group)
    return sorted({str(OmegaConf.load(str(path)).name) for path in folder.iterdir() if path.name.endswith(".yaml")})


# (key, rule, what is allowed); a key that the chosen option does not have is not checked.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("model.name", lambda v: v in shipped_names("model"), f"one of {shipped_names('model')}"),
    ("model.filters", _sizes, "a non-empty list of whole numbers >= 1"),
    ("model.hidden_units", _sizes, "a non-empty list of whole numbers >= 1"),
    ("model.dense_units", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("model.convs_per_block", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("model.conv_dropout", _rate, "a rate in [0, 1)"),
    ("model.dense_dropout", _rate, "a rate in [0, 1)"),
    ("model.dropout", _rate, "a rate in [0, 1)"),
    ("optimizer.name", lambda v: v in shipped_names("optimizer"), f"one of {shipped_names('optimizer')}"),
    ("optimizer.lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("optimizer.rho", _rate, "a number in [0, 1)"),
    ("optimizer.beta_1", _rate, "a number in [0, 1)"),
    ("optimizer.beta_2", _rate, "a number in [0, 1)"),
    ("optimizer.momentum", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("optimizer.epsilon", lambda v: _number(v) and v > 0, "a number > 0"),
    ("optimizer.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("optimizer.nesterov", lambda v: isinstance(v, bool), "true or false"),
    ("trainer.epochs", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("trainer.batch_size", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("trainer.eval_batch_size", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("trainer.seed", lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    ("trainer.diverge_loss", lambda v: _number(v) and v > 0, "a number > 0"),
    ("data.val_fraction", lambda v: _number(v) and 0 < v < 1, "a number between 0 and 1"),
    ("data.train_size", lambda v: v is None or (_whole(v) and 100 <= v <= 60000), "null or 100..60000"),
    ("optimizer.schedule", lambda v: v in SCHEDULES, f"one of {list(SCHEDULES)}"),
    ("optimizer.warmup_fraction", lambda v: _number(v) and 0 < v < 1, "a share between 0 and 1"),
    ("optimizer.warmup_steps", lambda v: _whole(v) and v >= 0, "a whole number of steps >= 0"),
    ("data.augment", lambda v: v in AUGMENTS, f"one of {list(AUGMENTS)}"),
    ("data.max_shift", lambda v: _whole(v) and 0 <= v <= 14, "a whole number of pixels in 0..14"),
    ("trainer.precision", lambda v: v in PRECISIONS, f"one of {list(PRECISIONS)}"),
    ("trainer.label_smoothing", _rate, "a number in [0, 1)"),
    ("tracking.test_set", lambda v: v in TEST_SETS, f"one of {list(TEST_SETS)}"),
    ("trainer.verbose", lambda v: v in (0, 1, 2) and not isinstance(v, bool), "0, 1 or 2 (Keras' fit verbosity)"),
    # MLflow 3.17's SQL stores keep 256 characters of an experiment's name and 250 of a run's (its parent is named
    # "<sweep_name> <date time> #k"): longer names fail in the store, after it was created.
    (
        "tracking.experiment",
        lambda v: isinstance(v, str) and len(v.strip()) > 0 and len(v) <= 256,
        "an experiment name of 1 to 256 characters",
    ),
    (
        "sweep_name",
        lambda v: isinstance(v, str) and len(v.strip()) > 0 and len(v) <= 200,
        "a name of 1 to 200 characters",
    ),
    (
        "recipe",
        lambda v: v is None or (isinstance(v, str) and 0 < len(v.strip()) <= 250),
        "null or a 1-250 character name",
    ),
    ("tracking.log_model", lambda v: isinstance(v, bool), "true or false"),
    ("tracking.system_metrics", lambda v: isinstance(v, bool), "true or false"),
    ("tracking.system_metrics_interval", lambda v: _number(v) and 1 <= v <= 3600, "a number of seconds in 1..3600"),
    (
        "tracking.registered_model",
        lambda v: v is None or (isinstance(v, str) and 0 < len(v.strip()) <= 250),
        "null or a name of 1 to 250 characters",
    ),
    ("tracking.register_single_runs", lambda v: isinstance(v, bool), "true or false"),
    ("tracking.request_retries", lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    ("tracking.request_backoff", lambda v: _whole(v) and v >= 0, "a whole number of seconds >= 0"),
    ("tracking.request_timeout", lambda v: _number(v) and v > 0, "a number of seconds > 0"),
    ("lr_find.start_lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("lr_find.end_lr", lambda v: _number(v) and v > 0, "a number > 0 (and > lr_find.start_lr)"),
    ("lr_find.steps", lambda v: _whole(v) and v >= 2, "a whole number >= 2"),
    ("lr_find.smoothing", _rate, "a number in [0, 1)"),
    ("lr_find.stop_factor", lambda v: _number(v) and v > 1, "a number > 1"),
    ("task", lambda v: v in TASKS, f"one of {list(TASKS)}"),
    ("control.name", lambda v: v in shipped_names("control"), f"one of {shipped_names('control')}"),
    ("control.optimizer", lambda v: v in shipped_names("optimizer"), f"one of {shipped_names('optimizer')}"),
    ("control.lr", lambda v: _number(v) and v > 0, "a number > 0"),
]


@functools.cache
def option_keys(group: str, option: str) -> list[str] | None:
    """The keys of conf/<group>/<option>.yaml as shipped: that option's schema (None for an option of the user's)."""
    path = resources.files("fashion_sweep.conf").joinpath(group, f"{option}.yaml")
    return [str(key) for key in OmegaConf.load(str(path))] if path.is_file() else None


@functools.cache
def root_keys() -> list[str]:
    path = resources.files("fashion_sweep.conf").joinpath("config.yaml")
    return [str(k) for k in OmegaConf.load(str(path)) if k not in ("defaults", "hydra")]


def check_keys(cfg: DictConfig, choices: Mapping[str, Any]) -> None:
    """Refuse a key that the chosen option's YAML does not have (a typo, or a `+key=value` nobody reads)."""
    known = {"": [*root_keys(), *GROUPS]}
    for group in GROUPS:
        keys = option_keys(group, str(choices.get(group)))
        if keys is not None:
            known[group] = keys
    for prefix, keys in known.items():
        node = cfg.get(prefix) if prefix else cfg
        for key in [str(k) for k in node] if isinstance(node, DictConfig) else []:
            if key not in keys:
                raise unknown_key(f"{prefix}.{key}" if prefix else key, choices)


def unknown_key(name: str, choices: Mapping[str, Any]) -> ConfigError:
    """The refusal of a dotted key that the chosen option's YAML (or the root config) does not have, with the
    closest key it has."""
    prefix, _, key = name.rpartition(".")
    if prefix in GROUPS and (keys := option_keys(prefix, str(choices.get(prefix)))) is not None:
        where = f"{prefix}={choices.get(prefix)}"
    elif not prefix:
        keys, where = [*root_keys(), *GROUPS], "the config"
    else:
        return ConfigError(f"{name} is not a key of the config")
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return ConfigError(f"{name} is not a key of {where} (its keys: {', '.join(keys)}){hint}")


def leaves(node: Any, prefix: str = "", split_lists: bool = True) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain container; list items as key[i], or whole lists as one leaf."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.", split_lists)
    elif isinstance(node, list) and split_lists:
        for i, value in enumerate(node):
            yield from leaves(value, f"{prefix.rstrip('.')}[{i}].", split_lists)
    else:
        yield prefix.rstrip("."), node


def check_finite(cfg: DictConfig) -> None:
    for key, value in leaves(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not allowed: numbers must be finite")


def check_rules(cfg: DictConfig) -> None:
    for key, ok, allowed in RULES:
        group, _, name = key.partition(".")
        if name and name not in cfg[group]:  # a key the chosen option lacks (a top-level key is always there)
            continue
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def check_across_keys(cfg: DictConfig) -> None:
    """The rules across keys: the LR range test runs upwards; schedule-free AdamW takes no schedule."""
    start, end = cfg.lr_find.start_lr, cfg.lr_find.end_lr
    if end <= start:
        raise ConfigError(f"lr_find.end_lr={end!r} is not allowed: expected a number > lr_find.start_lr={start!r}")
    schedule = cfg.optimizer.get("schedule", "constant")
    if cfg.optimizer.name == "schedule_free_adamw" and schedule != "constant":
        raise ConfigError(
            f"optimizer.schedule={schedule!r} is not allowed with optimizer=schedule_free_adamw: expected 'constant'"
            " (the method replaces the schedule; optimizer.warmup_steps warms it up)"
        )


def check_builds(cfg: DictConfig) -> None:
    """Build the model and the optimizer once, without training: what their constructors refuse is refused here."""
    from fashion_sweep.models import build_model  # Keras: imported only where a job needs it
    from fashion_sweep.optimizers import build_optimizer

    builders = {"model": build_model, "optimizer": lambda c: build_optimizer(c, total_steps=100)}  # and its schedule
    for group, build in builders.items():
        try:
            build(cfg[group])
        except Exception as err:  # Keras raises ValueError, TypeError, ... with multi-line messages
            first_line = " ".join(str(err).split())[:300]
            raise ConfigError(f"{group}={cfg[group].name} cannot be built from this config: {first_line}") from None


def check_no_secret(cfg: DictConfig) -> None:
    """A password or token in a value (tracking.uri=postgresql://user:PASSWORD@host/db) would be written to the
    store's params, the run's config.yaml and Hydra's .hydra/ folder: refused, naming where it belongs instead."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)  # ${oc.env:...} resolves into the params
    except Exception:  # an interpolation that does not resolve: check_keys and the run name it
        container = OmegaConf.to_container(cfg, resolve=False)
    if refusal := credentials.first_secret(leaves(container)):
        raise ConfigError(refusal)


def validate(cfg: DictConfig, choices: Mapping[str, Any], build: bool = True) -> None:
    """Raise ConfigError for the first key that breaks a rule: carries a secret, unknown, not finite, out of range,
    not buildable."""
    check_no_secret(cfg)
    check_keys(cfg, choices)
    check_finite(cfg)
    check_rules(cfg)
    check_across_keys(cfg)
    if build:
        check_builds(cfg)


def check_data_and_store(cfg: DictConfig) -> Path:
    """What a run needs outside its config: the data (located and verified) and a store it can write to; returns
    the data's folder. Neither check imports TensorFlow, so a wrong folder or server is refused within the app's
    start-up."""
    from fashion_sweep import data, store

    try:
        folder = data.locate_once(cfg.data.dir, cfg.data.system_dir, cfg.data.cache_dir, cfg.data.url)
        store.check(str(cfg.tracking.uri), cfg.tracking.artifact_location, str(cfg.tracking.experiment))
    except (data.DataError, store.StoreError) as err:
        raise ConfigError(str(err)) from None
    return folder
