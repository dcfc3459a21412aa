"""The networks' own layers: fused batch norm computes what Keras' BatchNormalization computes, and what is saved
or checkpointed stays readable by plain Keras and by runs made before it."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from fashion_sweep import checkpoint, models
from fashion_sweep.models import FusedBatchNormalization, build_model, with_keras_layers

CNN_BN = {"name": "cnn_bn", "filters": [4, 8], "conv_dropout": 0.1, "dense_units": 16, "dense_dropout": 0.1}


def paired(shape: tuple[int, ...], policy: str = "float32") -> tuple[tuple[keras.layers.Layer, ...], np.ndarray]:
    """Keras' BatchNormalization (float32) and ours (under policy) with the same weights, and inputs for both."""
    rng = np.random.default_rng(0)
    keras_bn = keras.layers.BatchNormalization(momentum=0.9)
    keras.mixed_precision.set_global_policy(policy)
    try:
        fused = FusedBatchNormalization(momentum=0.9)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    gamma, beta = rng.normal(1.0, 0.3, shape[-1:]), rng.normal(0.0, 0.3, shape[-1:])
    for layer in (keras_bn, fused):
        layer.build(shape)
        layer.gamma.assign(gamma.astype("float32"))
        layer.beta.assign(beta.astype("float32"))
    return (keras_bn, fused), rng.normal(2.0, 3.0, shape).astype("float32")


@pytest.mark.parametrize("shape", [(32, 6, 6, 5), (32, 7)])  # after a conv layer, after a dense layer
def test_fused_batch_norm_computes_what_keras_batch_norm_computes(shape: tuple[int, ...]) -> None:
    (keras_bn, fused), x = paired(shape)
    weights = tf.constant(np.random.default_rng(1).normal(size=shape).astype("float32"))  # a loss with gradients
    for training in (True, False):
        grads = []
        for layer in (keras_bn, fused):
            with tf.GradientTape() as tape:
                inputs = tf.constant(x)
                tape.watch(inputs)
                out = layer(inputs, training=training)
                loss = tf.reduce_sum(out * weights)
            grads.append([out, *tape.gradient(loss, [inputs, layer.gamma, layer.beta])])
        for ours, theirs in zip(grads[1], grads[0], strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
        # The moving statistics after a training step: Keras' (no Bessel correction), not the kernel's
        np.testing.assert_allclose(fused.moving_mean, keras_bn.moving_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fused.moving_variance, keras_bn.moving_variance, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fused.moving_variance, 1.0)  # the statistics did move


def test_fused_batch_norm_in_mixed_bfloat16_answers_in_bfloat16_from_float32_statistics() -> None:
    (keras_bn, fused), x = paired((32, 6, 6, 5), policy="mixed_bfloat16")
    out = fused(tf.cast(x, tf.bfloat16), training=True)
    assert out.dtype == tf.bfloat16 and fused.moving_variance.dtype == "float32"
    expected = keras_bn(x, training=True)
    np.testing.assert_allclose(tf.cast(out, tf.float32), expected, rtol=0.02, atol=0.03)  # bfloat16: ~3 digits
    np.testing.assert_allclose(fused.moving_variance, keras_bn.moving_variance, rtol=0.01)


def test_cnn_bn_uses_fused_batch_norm_under_keras_names() -> None:
    keras.backend.clear_session()
    model = build_model(OmegaConf.create(CNN_BN))
    fused = [layer for layer in model.layers if isinstance(layer, FusedBatchNormalization)]
    names = ["batch_normalization"] + [f"batch_normalization_{i}" for i in range(1, 5)]
    assert [layer.name for layer in fused] == names  # Keras' own: checkpoints of older cnn_bn runs keep their paths


def compiled_cnn_bn() -> keras.Model:
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = build_model(OmegaConf.create(CNN_BN))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def test_a_checkpoint_from_keras_batch_norm_restores_into_fused_cnn_bn(monkeypatch, tmp_path, fashion_dir) -> None:
    from fashion_sweep import data

    split = data.split(data.load(fashion_dir), 0.1, 1000, seed=0)
    with monkeypatch.context() as before:  # cnn_bn as fashion-sweep built it before fused batch norm
        before.setattr(models, "FusedBatchNormalization", keras.layers.BatchNormalization)
        old = compiled_cnn_bn()
        assert not any(isinstance(layer, FusedBatchNormalization) for layer in old.layers)
        old.fit(split.x_train[:256], split.y_train[:256], batch_size=64, epochs=1, verbose=0)
        expected = old.predict(split.x_val[:64], verbose=0)
        sha = checkpoint.save(checkpoint.capture(old, 1, {"loss": [1.0]}, 1.0), tmp_path / "old.npz")
    new = compiled_cnn_bn()
    checkpoint.restore(new, checkpoint.load(tmp_path / "old.npz", sha))
    np.testing.assert_allclose(new.predict(split.x_val[:64], verbose=0), expected, rtol=1e-4, atol=1e-5)


def test_the_saved_model_has_keras_layers_and_loads_without_fashion_sweep(tmp_path, fashion_dir) -> None:
    from fashion_sweep import data

    model = compiled_cnn_bn()
    split = data.split(data.load(fashion_dir), 0.1, 1000, seed=0)
    model.fit(split.x_train[:256], split.y_train[:256], batch_size=64, epochs=1, verbose=0)
    saved = with_keras_layers(model)
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in saved.layers)
    assert [layer.name for layer in saved.layers] == [layer.name for layer in model.layers]
    saved.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", split.x_val[:64])
    np.save(tmp_path / "expected.npy", model.predict(split.x_val[:64], verbose=0))
    load = (
        "import sys, numpy as np, keras\n"
        "model = keras.saving.load_model(sys.argv[1] + '/model.keras')\n"
        "assert 'fashion_sweep' not in sys.modules\n"
        "got = model.predict(np.load(sys.argv[1] + '/x.npy'), verbose=0)\n"
        "np.testing.assert_allclose(got, np.load(sys.argv[1] + '/expected.npy'), rtol=1e-4, atol=1e-5)\n"
    )
    proc = subprocess.run([sys.executable, "-c", load, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_model_without_fused_batch_norm_is_saved_as_it_is() -> None:
    seed = build_model(OmegaConf.create({**CNN_BN, "name": "seed_cnn"}))
    assert with_keras_layers(seed) is seed


def ops_of(layer: keras.layers.Layer, shape: tuple[int, ...]) -> set[str]:
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(tf.TensorSpec(shape)).graph
    return {op.type for op in graph.get_operations()}


def test_keras_batch_norm_is_still_unfused_on_tensorflow_so_ours_is_needed() -> None:
    """Keras 3.15 normalises with separate ops; when an upgrade fuses its layer, ours can go (this fails then)."""
    shape = (8, 4, 4, 3)
    assert not {"FusedBatchNormV3", "FusedBatchNorm"} & ops_of(keras.layers.BatchNormalization(), shape)
    assert "FusedBatchNormV3" in ops_of(FusedBatchNormalization(), shape)
