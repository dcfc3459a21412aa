"""The networks: one builder per conf/model/*.yaml, each returning an uncompiled keras.Model.

Owns the layer lists; every size and rate comes from the YAML. The output layer computes in float32 whatever
the precision policy (Keras' advice for mixed precision: a softmax in bfloat16 loses too much). It does not
compile, train or log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import keras
import tensorflow as tf
from keras import layers
from omegaconf import DictConfig, OmegaConf

from fashion_sweep import tf_internals
from fashion_sweep.data import IMAGE_SHAPE, NUM_CLASSES


def output_layer() -> layers.Layer:
    """The 10-way softmax, in float32 under any precision policy."""
    return layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32")


@keras.saving.register_keras_serializable(package="fashion_sweep")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization computed by TensorFlow's fused kernel: the same weights, statistics and names.

    Keras 3.15 normalises with a chain of separate ops on TensorFlow (keras-team/keras-core#225): best_cnn's epoch
    took 31 s, 16 s fused (2 Xeon cores, bfloat16; 35 and 23 s in float32). The one fused op (as tf.keras 2 used)
    takes bfloat16 inputs and keeps its statistics in float32. Other ranks or axes, masks and renorm: Keras' code.
    """

    def __init__(self, **kwargs: Any) -> None:
        if "name" not in kwargs:  # Keras' own names (batch_normalization, _1, ...): checkpoints keep their paths
            uid = keras.backend.get_uid("batch_normalization")
            kwargs["name"] = "batch_normalization" if uid == 1 else f"batch_normalization_{uid - 1}"
        super().__init__(**kwargs)

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        rank = len(inputs.shape)
        plain = rank not in (2, 4) or self.axis not in (-1, rank - 1) or not (self.center and self.scale)
        if plain or mask is not None or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        training = bool(training and self.trainable)
        shape = tf.shape(inputs)
        x = tf.reshape(inputs, [-1, 1, 1, shape[-1]]) if rank == 2 else inputs  # the kernel wants NHWC
        mean, variance = tf.convert_to_tensor(self.moving_mean), tf.convert_to_tensor(self.moving_variance)
        y, batch_mean, batch_variance = tf_internals.fused_batch_norm(
            x, self.gamma, self.beta, None if training else mean, None if training else variance, self.epsilon, training
        )  # fmt: skip
        if training:  # the kernel's variance has Bessel's correction, Keras' moving statistics have none
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), batch_variance.dtype)
            keep = self.momentum
            self.moving_mean.assign(mean * keep + batch_mean * (1.0 - keep))
            self.moving_variance.assign(variance * keep + batch_variance * (count - 1) / count * (1.0 - keep))
        return tf.cast(tf.reshape(y, shape) if rank == 2 else y, self.compute_dtype)


def seed_cnn(
    filters: Sequence[int], conv_dropout: float, dense_units: int, dense_dropout: float, name: str = "seed_cnn"
) -> keras.Model:
    """The reference: [Conv2D-MaxPool-Dropout] per filter count, Flatten-Dense-Dropout-Dense(10).

    With filters=[128] and dense_units=128 it is the reference write-up's wider variant (readme_cnn).
    """
    blocks = []
    for n in filters:
        blocks += [
            layers.Conv2D(n, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Dropout(conv_dropout),
        ]
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            *blocks,
            layers.Flatten(),
            layers.Dense(dense_units, activation="relu"),
            layers.Dropout(dense_dropout),
            output_layer(),
        ],
        name=name,
    )


def cnn_bn(
    filters: Sequence[int],
    conv_dropout: float,
    dense_units: int,
    dense_dropout: float,
    convs_per_block: int = 2,
    name: str = "cnn_bn",
) -> keras.Model:
    """Per filter count convs_per_block x [Conv2D-BatchNorm-ReLU], MaxPool, Dropout; then
    Dense-BatchNorm-ReLU-Dropout-Dense(10). With convs_per_block=1 it is seed_cnn's layout with batch norm."""
    blocks = []
    for n in filters:
        for _ in range(convs_per_block):
            blocks += [layers.Conv2D(n, 3, padding="same", use_bias=False), FusedBatchNormalization(), layers.ReLU()]
        blocks += [layers.MaxPooling2D(), layers.Dropout(conv_dropout)]
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            *blocks,
            layers.Flatten(),
            layers.Dense(dense_units, use_bias=False),
            FusedBatchNormalization(),
            layers.ReLU(),
            layers.Dropout(dense_dropout),
            output_layer(),
        ],
        name=name,
    )


def mlp(hidden_units: Sequence[int], dropout: float, name: str = "mlp") -> keras.Model:
    """A dense baseline: Flatten, then Dense(relu)-Dropout per hidden layer, then Dense(10)."""
    hidden = []
    for n in hidden_units:
        hidden += [layers.Dense(n, activation="relu"), layers.Dropout(dropout)]
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            layers.Flatten(),
            *hidden,
            output_layer(),
        ],
        name=name,
    )


def with_keras_layers(model: keras.Model) -> keras.Model:
    """model, or where it has fused batch norm a copy with Keras' own BatchNormalization and the same weights:
    what is saved for users loads with plain Keras, without fashion_sweep."""
    if not any(isinstance(layer, FusedBatchNormalization) for layer in model.layers):
        return model

    def keras_layer(layer: layers.Layer) -> layers.Layer:
        kind = layers.BatchNormalization if isinstance(layer, FusedBatchNormalization) else type(layer)
        return kind.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=keras_layer)
    copy.set_weights(model.get_weights())
    return copy


BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "seed_cnn": seed_cnn,
    "readme_cnn": seed_cnn,  # the same network, one wider block: see conf/model/readme_cnn.yaml
    "cnn_bn": cnn_bn,
    "mlp": mlp,
}


def build_model(cfg: DictConfig) -> keras.Model:
    """The builder for cfg.name, called with the keys of conf/model/<name>.yaml (name included)."""
    knobs = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    return BUILDERS[knobs["name"]](**knobs)
