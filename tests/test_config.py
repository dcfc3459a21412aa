"""Hydra composition of every option and preset, the config checks, and the YAML's own conventions."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from fashion_sweep.config import ConfigError, shipped_names, validate
from fashion_sweep.models import BUILDERS, build_model
from fashion_sweep.optimizers import OPTIMIZERS as KERAS_OPTIMIZERS
from fashion_sweep.optimizers import build_optimizer

CONF = Path(__file__).parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str, hydra: bool = False) -> DictConfig:
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def check(*overrides: str) -> DictConfig:
    """Compose as a job would and run every check a job runs before its MLflow run opens."""
    cfg = composed(*overrides, hydra=True)
    with open_dict(cfg):
        choices = cfg.hydra.runtime.choices
        del cfg["hydra"]
    validate(cfg, choices)
    return cfg


def test_groups_offer_the_documented_options() -> None:
    assert options("model") == ["cnn_bn", "mlp", "readme_cnn", "seed_cnn"]
    assert options("optimizer") == ["adam", "adamw", "rmsprop", "schedule_free_adamw", "sgd"]
    assert options("control") == ["none", "sweep_free"]
    assert options("experiment") == ["best_cnn", "lr_find", "lr_sweep", "optimizer_sweep"]


def test_defaults_are_the_references() -> None:
    cfg = composed()
    assert (cfg.model.name, cfg.optimizer.name, cfg.optimizer.lr) == ("seed_cnn", "rmsprop", 0.001)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (20, 128)
    assert list(cfg.model.filters) == [32, 64] and cfg.model.dense_units == 256


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_every_model_and_optimizer_composes_and_builds(model: str, optimizer: str) -> None:
    cfg = check(f"model={model}", f"optimizer={optimizer}", "optimizer.lr=0.003")
    net = build_model(cfg.model)
    opt = build_optimizer(cfg.optimizer)
    assert net.output_shape == (None, 10)
    assert net.name == model
    assert math.isclose(float(opt.learning_rate), 0.003, rel_tol=1e-6)


def test_layer_sizes_come_from_the_yaml() -> None:
    net = build_model(composed("model.filters=[16]", "model.dense_units=48").model)
    assert [layer.filters for layer in net.layers if hasattr(layer, "filters")] == [16]
    assert [layer.units for layer in net.layers if hasattr(layer, "units")] == [48, 10]


def test_readme_cnn_is_the_write_ups_wider_variant() -> None:
    net = build_model(composed("model=readme_cnn").model)
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["Conv2D", "MaxPooling2D", "Dropout", "Flatten", "Dense", "Dropout", "Dense"]
    assert net.layers[0].filters == 128 and net.layers[0].kernel_size == (3, 3) and net.layers[4].units == 128


def test_cnn_bn_stacks_convs_per_block_conv_batchnorm_relu_layers_per_block() -> None:
    def kinds(*overrides: str) -> list[str]:
        return [type(layer).__name__ for layer in build_model(composed("model=cnn_bn", *overrides).model).layers]

    block = ["Conv2D", "FusedBatchNormalization", "ReLU"]
    head = ["Flatten", "Dense", "FusedBatchNormalization", "ReLU", "Dropout", "Dense"]
    pool = ["MaxPooling2D", "Dropout"]
    assert kinds("model.filters=[8]") == block * 2 + pool + head
    assert kinds("model.filters=[8,16]", "model.convs_per_block=1") == (block + pool) * 2 + head


def test_sgd_has_nesterov_momentum() -> None:
    opt = build_optimizer(composed("optimizer=sgd").optimizer)
    assert opt.nesterov and opt.momentum == 0.9


@pytest.mark.parametrize("preset", [p for p in options("experiment") if p not in ("lr_find", "best_cnn")])  # one run
def test_every_sweep_preset_composes(preset: str) -> None:
    cfg = composed(f"experiment={preset}", hydra=True)
    assert cfg.sweep_name == preset
    assert "optimizer.lr" in cfg.hydra.sweeper.params


def swept_values(params: DictConfig) -> list[dict[str, str]]:
    """Expand hydra.sweeper.params the way Hydra's basic sweeper does; one dict per job."""
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (batch,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return [dict(o.split("=", 1) for o in job) for job in batch]


def test_lr_sweep_expands_to_log_spaced_rates_around_0_001() -> None:
    cfg = composed("experiment=lr_sweep", hydra=True)
    jobs = swept_values(cfg.hydra.sweeper.params)
    in_yaml = re.search(r"optimizer\.lr: ([^ #]+)", (CONF / "experiment" / "lr_sweep.yaml").read_text())
    assert in_yaml is not None
    assert [float(job["optimizer.lr"]) for job in jobs] == [float(v) for v in in_yaml.group(1).split(",")]
    rates = sorted(float(job["optimizer.lr"]) for job in jobs)
    assert 0.001 in rates and rates[0] <= 1e-4 and rates[-1] >= 1e-2
    ratios = [b / a for a, b in zip(rates, rates[1:], strict=False)]
    assert max(ratios) / min(ratios) < 1.01  # evenly spaced on a log scale


def test_optimizer_sweep_crosses_the_rates_with_three_optimizers() -> None:
    jobs = swept_values(composed("experiment=optimizer_sweep", hydra=True).hydra.sweeper.params)
    lr_jobs = swept_values(composed("experiment=lr_sweep", hydra=True).hydra.sweeper.params)
    assert {job["optimizer"] for job in jobs} == {"rmsprop", "adam", "sgd"}
    assert len(jobs) == 3 * len(lr_jobs)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=0", r"optimizer.lr=0 is not allowed: expected a number > 0"),
        ("optimizer.lr=-0.1", r"optimizer.lr=-0.1 is not allowed"),
        ("optimizer.lr=fast", r"optimizer.lr='fast' is not allowed"),
        ("trainer.epochs=0", r"trainer.epochs=0 is not allowed: expected a whole number >= 1"),
        ("trainer.batch_size=0", r"trainer.batch_size=0 is not allowed"),
        ("trainer.eval_batch_size=0", r"trainer.eval_batch_size=0 is not allowed: expected a whole number >= 1"),
        ("data.val_fraction=1.5", r"data.val_fraction=1.5 is not allowed"),
        ("tracking.log_model=maybe", r"tracking.log_model='maybe' is not allowed: expected true or false"),
        ("optimizer=sgd optimizer.nesterov=maybe", r"optimizer.nesterov='maybe' is not allowed: expected true or"),
        ("trainer.verbose=5", r"trainer.verbose=5 is not allowed: expected 0, 1 or 2"),
        ("tracking.experiment=", r"tracking.experiment='' is not allowed: expected an experiment name"),
        ("tracking.test_set=best", r"tracking.test_set='best' is not allowed: expected one of \['selected', 'all',"),
        ("optimizer=schedule_free_adamw optimizer.warmup_steps=-1", r"optimizer.warmup_steps=-1 is not allowed"),
        ("control=sweep_free control.lr=0", r"control.lr=0 is not allowed: expected a number > 0"),
        ("control=sweep_free control.optimizer=lion", r"control.optimizer='lion' is not allowed: expected one of"),
    ],
)
def test_out_of_range_values_are_refused_naming_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check(*override.split())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+trainer.epoch=3", "trainer.epoch is not a key of trainer=default .*; did you mean trainer.epochs[?]"),
        ("+optimizer.lrr=0.1", "optimizer.lrr is not a key of optimizer=rmsprop .*; did you mean optimizer.lr[?]"),
        ("+model.extra=3", r"model.extra is not a key of model=seed_cnn \(its keys: name, filters, "),
        ("+unknown=1", "unknown is not a key of the config"),
        ("optimizer.lr=inf", "optimizer.lr=inf is not allowed: numbers must be finite"),
        ("optimizer.lr=-inf", "optimizer.lr=-inf is not allowed: numbers must be finite"),
        ("trainer.diverge_loss=nan", "trainer.diverge_loss=nan is not allowed: numbers must be finite"),
        ("model.conv_dropout=1.0", r"model.conv_dropout=1.0 is not allowed: expected a rate in \[0, 1\)"),
        ("model.filters=[-8]", r"model.filters=\[-8\] is not allowed"),
        ("optimizer.rho=1.5", "optimizer.rho=1.5 is not allowed"),
        ("model.filters=[8,8,8,8,8,8]", "model=seed_cnn cannot be built from this config: .*zero or negative"),
    ],
)
def test_unknown_keys_non_finite_and_unbuildable_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check(override)


def test_the_config_names_every_model_and_optimizer_the_builders_know() -> None:
    assert shipped_names("model") == sorted(BUILDERS) and shipped_names("optimizer") == sorted(KERAS_OPTIMIZERS)


KEY_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*:(?!\s*$)")  # "key: value" (a key opening a block may go uncommented)


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_key_with_a_value_has_a_comment(path: Path) -> None:
    lines = [line for line in path.read_text().splitlines() if KEY_LINE.match(line)]
    uncommented = [line for line in lines if " # " not in line and "  #" not in line]
    assert not uncommented, f"{path.name}: keys without a one-line comment: {uncommented}"
    assert OmegaConf.load(path) is not None
