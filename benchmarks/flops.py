"""How much arithmetic seed_cnn's training needs, and how much this machine can do: the utilisation benchmark.

Counting rule (from the layer shapes, one image):
- Conv2D: forward multiply-adds = out_height * out_width * filters * (kernel_h * kernel_w * in_channels);
  Dense: in_units * out_units. A multiply-add is 2 floating-point operations.
- Training = forward + backward. The backward pass of such a layer does the same multiply-adds twice
  (gradient of the weights, gradient of the input), except the first layer, whose input needs no gradient:
  3x forward for every layer but the first, 2x for the first.
- Bias adds, activations, pooling, dropout, the loss and the optimizer update are elementwise and left out
  (under 1% of the total for seed_cnn), so the count is a slight underestimate.
The peak is the best of large float32 matmuls (512 to 4096 square) in TensorFlow, same process settings.
"""

from __future__ import annotations

import math
import time

import keras
import tensorflow as tf


def forward_macs(layer: keras.layers.Layer) -> int:
    """Multiply-adds of one image through layer (0 for layers without a weight matrix)."""
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw, c_in, filters = layer.kernel.shape
        _, height, width, _ = layer.output.shape
        return height * width * filters * kh * kw * c_in
    if isinstance(layer, keras.layers.Dense):
        n_in, n_out = layer.kernel.shape
        return n_in * n_out
    return 0


def training_flops_per_image(model: keras.Model) -> int:
    """Forward + backward floating-point operations of one training image, by the rule in the docstring."""
    macs = [forward_macs(layer) for layer in model.layers]
    weighted = [m for m in macs if m]
    return 2 * (2 * weighted[0] + 3 * sum(weighted[1:]))


def matmul_flops(size: int, seconds: float) -> float:
    """FLOP/s of repeated size x size float32 matmuls in TensorFlow, the best trial of ~seconds."""
    a = tf.random.normal((size, size), seed=1)
    b = tf.random.normal((size, size), seed=2)
    tf.linalg.matmul(a, b).numpy()  # warm-up
    best = math.inf
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def matmul_peak(sizes: tuple[int, ...] = (512, 1024, 2048, 4096), seconds: float = 4.0) -> dict[int, float]:
    """FLOP/s per matmul size; the machine's peak is the best of them (here 4096 ran ~2x slower than 1024)."""
    return {size: matmul_flops(size, seconds) for size in sizes}
