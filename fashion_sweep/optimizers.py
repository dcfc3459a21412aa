"""The optimizers: one Keras optimizer per conf/optimizer/*.yaml, at the learning rate optimizer.lr.

Owns the mapping from config to keras.optimizers and the learning-rate schedule (optimizer.schedule, with
optimizer.lr its peak); it does not choose learning rates (the sweep does). Schedule-free AdamW's averaged weights,
what its runs are evaluated at, are schedule_free.py's.
"""

from __future__ import annotations

from typing import Any, cast

import keras
from omegaconf import DictConfig, OmegaConf

from fashion_sweep import schedule_free

OPTIMIZERS: dict[str, type[keras.optimizers.Optimizer]] = {
    "rmsprop": keras.optimizers.RMSprop,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "schedule_free_adamw": schedule_free.ScheduleFreeAdamW,  # Keras' with its average mended: schedule_free.py
}
ONE_CYCLE_START = 25  # one_cycle warms up from lr / 25 (fastai's div), as in Smith's one-cycle policy


def learning_rate(peak: float, schedule: str, total_steps: int | None, warmup_fraction: float) -> Any:
    """peak as schedule says over total_steps training steps: constant; cosine from peak down to 0; one_cycle a
    linear warm-up from peak / 25 to peak over warmup_fraction of the steps, then cosine down to 0. Without
    total_steps (an LR range test, a build check) it is the constant peak."""
    if schedule == "constant" or total_steps is None:
        return peak
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=total_steps)
    warmup = max(1, round(total_steps * warmup_fraction))
    return keras.optimizers.schedules.CosineDecay(
        peak / ONE_CYCLE_START, decay_steps=max(1, total_steps - warmup), warmup_target=peak, warmup_steps=warmup
    )


def build_optimizer(cfg: DictConfig, total_steps: int | None = None) -> keras.optimizers.Optimizer:
    """OPTIMIZERS[cfg.name](learning_rate=<cfg.lr as cfg.schedule says>, <the other keys of the YAML>)."""
    knobs = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    name, lr = knobs.pop("name"), float(knobs.pop("lr"))
    schedule, warmup = knobs.pop("schedule", "constant"), knobs.pop("warmup_fraction", 0.0)
    return OPTIMIZERS[name](learning_rate=learning_rate(lr, schedule, total_steps, warmup), **knobs)
