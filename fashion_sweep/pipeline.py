"""The input pipeline: the training batches of every epoch (shuffled, optionally flipped and shifted) and the loss
on those labels.

Owns the data order per epoch, drawn from (seed, epoch) alone so that a continued run sees the same batches as one
never interrupted; where the images come from is data.py's, the run order is train.py's.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from fashion_sweep import data, tf_internals


def shift_and_flip(images: tf.Tensor, seed: tf.Tensor, max_shift: int) -> tf.Tensor:
    """Each image flipped left-right with probability 1/2 and shifted by up to max_shift pixels each way (the freed
    border black), drawn from seed alone (stateless), so a resumed run sees the same images."""
    flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    images = tf.image.stateless_random_flip_left_right(images, flip_seed)
    count = tf.shape(images)[0]
    shifts = tf.random.stateless_uniform([count, 2], shift_seed, -max_shift, max_shift + 1, dtype=tf.int32)
    dx, dy = tf.unstack(tf.cast(shifts, tf.float32), axis=1)
    return tf_internals.shift_images(images, dx, dy)


def training_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, first_epoch: int, epochs: int,
                     max_shift: int | None = None, label_smoothing: float = 0.0):  # fmt: skip
    """Shuffled batches for epochs first_epoch+1..epochs, each epoch's order (and, with max_shift, each batch's
    flips and shifts) drawn from (seed, epoch) alone: a run continued at any epoch sees the same data as one that
    was never interrupted. With label_smoothing the labels are one-hot (the loss smooths them)."""
    images, labels = tf.constant(x), tf.constant(y)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(tf.range(len(x)), seed=tf.stack([seed, epoch]))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return batches.map(lambda number, index: (tf.stack([seed, epoch]), number, index))

    def load(epoch_seed: tf.Tensor, number: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch, batch_labels = tf.gather(images, index), tf.gather(labels, index)
        if max_shift is not None:
            batch_seed = tf.random.experimental.stateless_fold_in(epoch_seed, number)
            batch = shift_and_flip(batch, batch_seed, max_shift)
        if label_smoothing:
            batch_labels = tf.one_hot(tf.cast(batch_labels, tf.int32), data.NUM_CLASSES)
        return batch, batch_labels

    # No autotuning: deleting an autotuned iterator waits for the tuner thread's current sleep, which grows to
    # 60 s, so model.fit returned 9-70 s after its last epoch in most full runs (TensorFlow 2.21, gdb stacks).
    options = tf.data.Options()
    options.autotune.enabled = False
    return (
        tf.data.Dataset.range(first_epoch, epochs)
        .flat_map(one_epoch)
        .map(load, num_parallel_calls=os.cpu_count() or 1)
        .prefetch(2)
        .with_options(options)
    )


def validation_labels(y: np.ndarray, label_smoothing: float) -> np.ndarray:
    """The validation labels in the form the loss takes: one-hot with label smoothing, else the integers."""
    return keras.utils.to_categorical(y, data.NUM_CLASSES) if label_smoothing else y


def training_loss(label_smoothing: float) -> keras.losses.Loss | str:
    """Cross-entropy on integer labels, or with label_smoothing on one-hot labels (Keras 3.15's sparse loss has no
    smoothing): each target 1 - label_smoothing + label_smoothing / 10, the other classes label_smoothing / 10."""
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
