"""The optimizers: one Keras optimizer per conf/optimizer/*.yaml, at the learning rate optimizer.lr.

Owns the mapping from config to keras.optimizers; it does not choose learning rates (the sweep does).
"""

from __future__ import annotations

from typing import Any, cast

import keras
from omegaconf import DictConfig, OmegaConf

OPTIMIZERS: dict[str, type[keras.optimizers.Optimizer]] = {
    "rmsprop": keras.optimizers.RMSprop,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
}


def build_optimizer(cfg: DictConfig) -> keras.optimizers.Optimizer:
    """OPTIMIZERS[cfg.name](learning_rate=cfg.lr, <the other keys of the YAML>)."""
    knobs = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    name, lr = knobs.pop("name"), knobs.pop("lr")
    return OPTIMIZERS[name](learning_rate=float(lr), **knobs)
