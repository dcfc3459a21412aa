"""The networks: one builder per conf/model/*.yaml, each returning an uncompiled keras.Model.

Owns the layer lists; every size and rate comes from the YAML. The output layer computes in float32 whatever
the precision policy (Keras' advice for mixed precision: a softmax in bfloat16 loses too much). It does not
compile, train or log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import keras
from keras import layers
from omegaconf import DictConfig, OmegaConf

from fashion_sweep.data import IMAGE_SHAPE, NUM_CLASSES


def output_layer() -> layers.Layer:
    """The 10-way softmax, in float32 under any precision policy."""
    return layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32")


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
            blocks += [layers.Conv2D(n, 3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU()]
        blocks += [layers.MaxPooling2D(), layers.Dropout(conv_dropout)]
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            *blocks,
            layers.Flatten(),
            layers.Dense(dense_units, use_bias=False),
            layers.BatchNormalization(),
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
