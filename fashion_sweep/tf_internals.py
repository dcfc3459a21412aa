"""TensorFlow's private, legacy and raw APIs this package uses, each behind one small function (checked on
TensorFlow 2.21 with Keras 3.15).

Owns nothing else. The tests that break if an upgrade changes what these rely on: test_options.py
(bias gradients, flip_shift), test_models.py (fused batch norm). TensorFlow's start-up tricks (stderr capture,
scikit-learn hidden during Keras' import) are backend.py's.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.framework import ops  # the gradient registry has no public setter


def sum_bfloat16_bias_gradients_in_float32() -> None:
    """Make the gradient of tf.nn.bias_add sum bfloat16 inputs in float32, as tf.reduce_sum does.

    Keras 3.15 adds every Conv2D and Dense bias with tf.nn.bias_add, whose CPU gradient kernel BiasAddGrad sums in
    the input's type for bfloat16 (TensorFlow 2.21 bias_op.cc promotes only half; tensorflow/tensorflow#86378):
    20% error over 100k values, the count of a 28x28 conv bias in a 128-image batch, against 0.2% with
    tf.reduce_sum. Other dtypes keep TensorFlow's own gradient, so it is never reverted. Idempotent.
    """
    entry = ops.gradient_registry._registry["BiasAdd"]
    if getattr(entry["type"], "sums_bfloat16_in_float32", False):
        return
    tensorflow_gradient = entry["type"]

    def bias_add_gradient(op: Any, grad: Any) -> Any:
        rank = grad.shape.rank
        if grad.dtype != tf.bfloat16 or rank is None:
            return tensorflow_gradient(op, grad)
        channel_axis = 1 if op.get_attr("data_format") == b"NCHW" else -1
        axes = [axis for axis in range(rank) if axis != channel_axis % rank]
        return grad, tf.reduce_sum(grad, axis=axes)  # TensorFlow sums bfloat16 in float32 here

    bias_add_gradient.sums_bfloat16_in_float32 = True  # type: ignore[attr-defined]
    entry["type"] = bias_add_gradient


def fused_batch_norm(x: Any, gamma: Any, beta: Any, mean: Any, variance: Any, epsilon: float, training: bool) -> Any:
    """TensorFlow's one fused batch-norm kernel on NHWC x (tf.compat.v1: Keras 3 has no fused path); returns
    (y, batch mean, batch variance with Bessel's correction). mean and variance are None when training."""
    return tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, mean, variance, epsilon=epsilon, is_training=training
    )  # fmt: skip


def shift_images(images: Any, dx: Any, dy: Any) -> Any:
    """Each image moved by (dx, dy) pixels, nearest pixel, the freed border black: output(x, y) = input(x + dx,
    y + dy). The raw op tf.image's public wrappers lost with tensorflow-addons; stateless, so resumable."""
    one, zero = tf.ones_like(dx), tf.zeros_like(dx)
    transforms = tf.stack([one, zero, dx, zero, one, dy, zero, zero], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="NEAREST", fill_mode="CONSTANT",
    )  # fmt: skip
