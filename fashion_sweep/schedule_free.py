"""Schedule-free AdamW as the method defines it, and its averaged weights x: the point its validation, test score
and logged model are taken at.

Keras 3.15's ScheduleFreeAdamW leaves the model's variables at the training point y and has no swap to x (the
reference implementation's optimizer.eval()). Owns the optimizer's update (ScheduleFreeAdamW below), computing x
from y and the optimizer's `momentum` slot z, recomputing batch-norm statistics at x, and the callback that
validates at x while training goes on from y. Which optimizer a config builds is optimizers.py's; when the swap
happens in a run, train.py's and scoring.py's.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

BATCH_NORM_BATCHES = 32  # training batches whose statistics at x replace the batch-norm layers' moving ones


@keras.saving.register_keras_serializable(package="fashion_sweep")
class ScheduleFreeAdamW(keras.optimizers.ScheduleFreeAdamW):
    """Keras' schedule-free AdamW mended: it starts from the model's weights, and x is the method's average, the
    mean of the steps z_1..z_t weighted by lr_t^2.

    Keras 3.15 (tests/test_schedule_free.py shows both): under model.fit its build's copy of the weights into z is
    lost, z starts at 0 and the first step replaces every weight by +-lr; and its update_step keeps
    `momentum_old = momentum.value`, on TensorFlow the variable itself, not a copy, read after z has moved, so its x
    is no average of the z's. Here z_0 = y_0 and x is read before z moves. Step t weighs lr_t^2, as in the reference
    (weight_lr_power=2), so warm-up steps count less; Keras weighs every step alike. Same variables as Keras'.
    """

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        dtype = variable.dtype
        step = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        z, velocity = self._momentums[index], self._velocities[index]
        gradient = ops.cast(gradient, dtype)

        z_old = ops.where(ops.equal(self.iterations, 0), variable, z)  # z_0 = y_0 (= x_0)
        x = ops.divide(ops.subtract(variable, ops.multiply(1 - beta_1, z_old)), beta_1)  # read before z moves
        warmed, weight = self.warmup_and_weight(step)
        self.assign_add(velocity, ops.multiply(ops.subtract(ops.square(gradient), velocity), 1 - beta_2))
        denominator = ops.add(ops.sqrt(ops.divide(velocity, 1 - ops.power(beta_2, step))), self.epsilon)
        lr = ops.cast(learning_rate, dtype) * warmed
        z_new = ops.subtract(z_old, ops.divide(ops.multiply(lr, gradient), denominator))
        self.assign(z, z_new)
        x = ops.add(ops.multiply(1 - weight, x), ops.multiply(weight, z_new))
        self.assign(variable, ops.add(ops.multiply(1 - beta_1, z), ops.multiply(beta_1, x)))

    def warmup_and_weight(self, step: Any) -> tuple[Any, Any]:
        """At step t: the warm-up factor f_t = min(t / W, 1) of lr, and z_t's weight in the average,
        f_t^2 / (f_1^2 + ... + f_t^2) (1 / t without warm-up)."""
        if not self.warmup_steps:
            return 1.0, 1.0 / step
        warmup = ops.cast(self.warmup_steps, step.dtype)
        m = ops.minimum(step, warmup)
        squares = m * (m + 1) * (2 * m + 1) / (6 * warmup * warmup) + ops.maximum(step - warmup, 0.0)
        factor = m / warmup
        return factor, factor * factor / squares


def applies(model: keras.Model) -> bool:
    """Whether model trains with schedule-free AdamW (and so must be evaluated at x)."""
    return isinstance(model.optimizer, keras.optimizers.ScheduleFreeAdamW)


def averaged_weights(model: keras.Model) -> list[np.ndarray]:
    """x for each trainable variable: x = (y - (1 - beta_1) z) / beta_1, the update y = (1 - beta_1) z + beta_1 x
    solved for x. Keras 3.15 keeps z in the private optimizer._momentums (tests/test_schedule_free.py checks it)."""
    optimizer = model.optimizer
    beta_1 = float(optimizer.beta_1)
    weights = []
    for variable in model.trainable_variables:
        z = keras.ops.convert_to_numpy(optimizer._momentums[optimizer._get_variable_index(variable)])
        y = keras.ops.convert_to_numpy(variable)
        weights.append((y - (1 - beta_1) * z) / beta_1)
    return weights


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def recompute_batch_norm(model: keras.Model, images: np.ndarray, batch_size: int) -> None:
    """Replace each batch-norm layer's moving mean and variance by their average over the first
    BATCH_NORM_BATCHES training batches, as the model now is (in training mode, as the reference recomputes them).
    The running average is Keras' own update with momentum k / (k + 1) at the k-th batch."""
    layers = batch_norm_layers(model)
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    try:
        for k, start in enumerate(range(0, min(len(images), BATCH_NORM_BATCHES * batch_size), batch_size)):
            for layer in layers:
                layer.momentum = k / (k + 1)  # k = 0: the first batch's statistics replace the old ones
            model(images[start : start + batch_size], training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum


def to_average(model: keras.Model, images: np.ndarray, batch_size: int) -> None:
    """Move model to x and recompute its batch-norm statistics there (images: the training split's, unaugmented)."""
    for variable, value in zip(model.trainable_variables, averaged_weights(model), strict=True):
        variable.assign(value)
    recompute_batch_norm(model, images, batch_size)


class ValidateAtAverage(keras.callbacks.Callback):
    """Inside model.fit: each validation at x, then every model variable (weights, batch-norm statistics, Dropout's
    seed state) put back as it was, so training, its checkpoints and a resume go on from y untouched."""

    def __init__(self, images: np.ndarray, batch_size: int) -> None:
        super().__init__()
        self.images, self.batch_size = images, batch_size
        self.saved: list[np.ndarray] = []

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.saved = [keras.ops.convert_to_numpy(v) for v in self.model.variables]
        to_average(self.model, self.images, self.batch_size)

    def on_test_end(self, logs: dict | None = None) -> None:
        for variable, value in zip(self.model.variables, self.saved, strict=True):
            variable.assign(value)
