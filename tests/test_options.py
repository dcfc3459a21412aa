"""Training options: precision per CPU, learning-rate schedules, flip/shift augmentation, label smoothing."""

from __future__ import annotations

import math

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_module
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fashion_sweep import continuation, data
from fashion_sweep.backend import choose_precision, cpu_flags, cpu_vendor, set_precision
from fashion_sweep.continuation import run_precision
from fashion_sweep.models import build_model
from fashion_sweep.optimizers import learning_rate
from fashion_sweep.pipeline import training_batches, training_loss
from tests.conftest import all_runs, fashion_sweep, store_uri


@pytest.mark.parametrize(
    ("setting", "flags", "vendor", "expected"),
    [
        ("auto", {"avx2", "amx_bf16", "avx512_bf16"}, "GenuineIntel", "bfloat16"),  # Intel Xeon with AMX: 1.92x
        ("auto", {"avx2", "avx512_bf16"}, "AuthenticAMD", "bfloat16"),  # AMD EPYC with AVX512_BF16: 1.45x
        ("auto", {"avx2", "avx512_bf16"}, "GenuineIntel", "float32"),  # Intel Xeon, AMX not exposed: 0.84x, 0.74x
        ("auto", {"avx2", "fma"}, "AuthenticAMD", "float32"),  # AMD EPYC without: bfloat16 emulated, 0.23x
        ("bfloat16", {"avx2"}, "AuthenticAMD", "bfloat16"),
        ("float32", {"amx_bf16"}, "GenuineIntel", "float32"),
    ],
)
def test_auto_precision_is_bfloat16_only_where_measured_faster(setting, flags, vendor, expected) -> None:
    assert choose_precision(setting, flags, vendor)[0] == expected


@pytest.mark.parametrize(
    ("flags", "vendor", "cap", "expected"),
    [
        ({"avx2", "amx_bf16", "avx512_bf16"}, "GenuineIntel", "AVX2", "float32"),  # as on an AVX2-only CPU
        ({"avx2", "amx_bf16", "avx512_bf16"}, "GenuineIntel", "avx512_core_bf16", "float32"),  # AMX capped off
        ({"avx2", "amx_bf16", "avx512_bf16"}, "GenuineIntel", "AVX512_CORE_AMX", "bfloat16"),
        ({"avx2", "avx512_bf16"}, "AuthenticAMD", "AVX512_CORE", "float32"),  # no bfloat16 instructions under it
        ({"avx2", "avx512_bf16"}, "AuthenticAMD", "AVX512_CORE_BF16", "bfloat16"),
        ({"avx2", "amx_bf16"}, "GenuineIntel", "ALL", "bfloat16"),  # ALL (and DEFAULT): no cap
        ({"avx2"}, "AuthenticAMD", "AVX512_CORE_AMX", "float32"),  # a cap adds no instruction the CPU lacks
    ],
)
def test_auto_precision_chooses_as_on_the_cpu_onednns_isa_cap_leaves(flags, vendor, cap, expected) -> None:
    precision, why = choose_precision("auto", flags, vendor, cap)
    assert precision == expected and f"ONEDNN_MAX_CPU_ISA={cap}" in why
    assert choose_precision("bfloat16", flags, vendor, "AVX2")[0] == "bfloat16"  # asked for: no cap changes it


def test_best_cnn_chooses_its_recipe_by_the_precision_it_trains_in(tmp_path) -> None:
    """Each precision asked for, and auto under an AVX2 cap, trains best_cnn's variant for it, tagged `recipe`."""
    small = ["data.train_size=400", "tracking.log_model=false", "trainer.verbose=0"]
    proc = fashion_sweep(tmp_path, "--multirun", "experiment=best_cnn", "trainer.precision=float32,bfloat16", *small)
    assert proc.returncode == 0, proc.stderr[-2000:]
    capped = fashion_sweep(tmp_path, "experiment=best_cnn", "trainer.precision=auto", "tracking.experiment=capped",
                           *small, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})  # fmt: skip
    assert capped.returncode == 0, capped.stderr[-2000:]
    runs = {(r.data.params["trainer.precision"], r.data.tags["precision"]): r for r in all_runs(tmp_path)
            if r.data.tags.get("sweep_role") != "parent"}  # fmt: skip
    expected = {("float32", "float32"): ("best_cnn-float32", "0.01", "12"),
                ("bfloat16", "bfloat16"): ("best_cnn-bfloat16", "0.003", "16"),
                ("auto", "float32"): ("best_cnn-float32", "0.01", "12")}  # fmt: skip
    assert set(runs) == set(expected)
    client = MlflowClient(store_uri(tmp_path / "mlruns"))
    for key, (recipe, peak, epochs) in expected.items():
        run = runs[key]
        assert (run.data.tags["recipe"], run.data.params["optimizer.lr"], run.data.params["trainer.epochs"]) == (
            recipe, peak, epochs)  # fmt: skip
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == int(epochs)  # trained as recorded
        lrs = client.get_metric_history(run.info.run_id, "lr")  # the one-cycle schedule peaks at the variant's peak
        assert max(m.value for m in lrs) == pytest.approx(float(peak), rel=0.05)
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in runs["auto", "float32"].data.tags["precision_reason"]


def test_the_cpu_is_read_from_proc_cpuinfo(tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_vendor(cpuinfo) == "GenuineIntel" and cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_vendor(tmp_path / "none") == "" and cpu_flags(tmp_path / "none") == set()


def test_a_continued_run_keeps_the_precision_it_began_in(tmp_path) -> None:
    client = MlflowClient(store_uri(tmp_path))
    experiment = client.create_experiment("continued")
    began_bf16 = client.create_run(experiment, tags={"precision": "bfloat16", "precision_reason": "auto: AMX"})
    began_f32 = client.create_run(experiment, tags={"precision": "float32", "precision_reason": "auto: no AMX"})
    older = client.create_run(experiment)  # written by a version before trainer.precision: trained in float32
    for run in (began_bf16, began_f32, older):
        client.set_terminated(run.info.run_id, "KILLED")
    continued = {run: client.get_run(run.info.run_id) for run in (began_bf16, began_f32, older)}
    assert run_precision("auto", continued[began_bf16]) == ("bfloat16", "auto: AMX")
    assert run_precision("auto", continued[began_f32]) == ("float32", "auto: no AMX")
    assert run_precision("auto", continued[older])[0] == "float32"
    assert run_precision("float32", continued[began_bf16]) == ("float32", "asked for")  # asked for wins
    assert run_precision("auto", None) == choose_precision("auto", cpu_flags(), cpu_vendor())  # new run: CPU decides


def test_a_best_cnn_run_continued_where_auto_picks_another_precision_keeps_its_variant(tmp_path, monkeypatch) -> None:
    client = MlflowClient(store_uri(tmp_path))
    began = client.create_run(client.create_experiment("continued"), tags={"precision": "bfloat16",
                                                                          "precision_reason": "auto: AMX"})  # fmt: skip
    client.set_terminated(began.info.run_id, "KILLED")
    previous = client.get_run(began.info.run_id)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # here auto picks float32, as on an AVX2-only CPU
    with initialize_config_module(version_base="1.3", config_module="fashion_sweep.conf"):
        cfg = compose("config", overrides=["experiment=best_cnn"])
    assert (cfg.recipe, cfg.trainer.epochs) == ("best_cnn-float32", 12)  # a new run here
    assert continuation.pin_precision(cfg, previous)
    assert (cfg.recipe, cfg.trainer.epochs, cfg.optimizer.lr) == ("best_cnn-bfloat16", 16, 0.003)  # as it began
    assert run_precision(cfg.trainer.precision, previous) == ("bfloat16", "auto: AMX")  # its reason kept
    assert not continuation.pin_precision(cfg, previous) and not continuation.pin_precision(cfg, None)


def test_mixed_bfloat16_computes_in_bfloat16_keeps_float32_weights_and_a_float32_softmax() -> None:
    cfg = OmegaConf.create({"name": "seed_cnn", "filters": [8], "conv_dropout": 0.1, "dense_units": 16,
                            "dense_dropout": 0.1})  # fmt: skip
    set_precision("bfloat16")
    try:
        model = build_model(cfg)
    finally:
        set_precision("float32")
    conv, output = model.layers[0], model.layers[-1]
    assert (conv.compute_dtype, conv.variable_dtype) == ("bfloat16", "float32")
    assert output.compute_dtype == "float32" and model(np.zeros((1, 28, 28, 1))).dtype == "float32"
    assert build_model(cfg).layers[0].compute_dtype == "float32"  # the default policy again


def test_bfloat16_conv_bias_gradients_are_summed_in_float32(fashion_dir) -> None:
    # A 28x28 conv bias sums its gradient over 128 x 28 x 28 values; TensorFlow 2.21's CPU kernel does it in
    # bfloat16 (off by 2358% here, the images centred so that the sum cancels), ours in float32.
    images = data.load(fashion_dir).x_train[:128].astype("float32") / 255
    upstream = np.repeat(images - images.mean(), 32, axis=-1) * np.linspace(0.5, 2, 32, dtype="float32")
    set_precision("bfloat16")
    try:
        conv = keras.layers.Conv2D(32, 3, padding="same")  # as in seed_cnn; Keras adds its bias with bias_add
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(conv(images), "float32") * upstream)
        got = tf.cast(tape.gradient(loss, conv.bias), "float64").numpy()
    finally:
        set_precision("float32")
    assert conv.compute_dtype == "bfloat16"
    exact = tf.cast(tf.cast(upstream, "bfloat16"), "float64").numpy().sum(axis=(0, 1, 2))  # what it was given
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.01  # measured 0.2%: rounding the result


def lr_at(schedule, step: int) -> float:
    return float(schedule(step)) if callable(schedule) else float(schedule)


def test_one_cycle_warms_up_from_a_25th_to_the_peak_then_decays_to_zero() -> None:
    schedule = learning_rate(0.01, "one_cycle", total_steps=1000, warmup_fraction=0.3)
    assert lr_at(schedule, 0) == pytest.approx(0.01 / 25)
    assert lr_at(schedule, 150) == pytest.approx((0.01 / 25 + 0.01) / 2, rel=1e-3)  # linear warm-up
    assert lr_at(schedule, 300) == pytest.approx(0.01)  # the peak is optimizer.lr
    assert lr_at(schedule, 650) == pytest.approx(0.005, rel=1e-3)  # cosine: half way down, half way through
    assert lr_at(schedule, 1000) == pytest.approx(0.0, abs=1e-9)


def test_cosine_decays_from_the_peak_and_constant_stays() -> None:
    cosine = learning_rate(0.002, "cosine", total_steps=100, warmup_fraction=0.3)
    assert [lr_at(cosine, s) for s in (0, 50, 100)] == pytest.approx([0.002, 0.001, 0.0], abs=1e-9)
    assert learning_rate(0.002, "constant", total_steps=100, warmup_fraction=0.3) == 0.002
    assert learning_rate(0.002, "one_cycle", total_steps=None, warmup_fraction=0.3) == 0.002  # e.g. lr_find


@pytest.fixture(scope="module")
def images(fashion_dir):
    split = data.split(data.load(fashion_dir), 0.1, 1000, seed=0)
    return split.x_train[:256], split.y_train[:256]


def first_batch(images, **options):
    x, y = images
    return next(iter(training_batches(x, y, 256, seed=3, first_epoch=0, epochs=1, **options)))


def test_flip_shift_changes_training_images_reproducibly_and_only_when_asked(images) -> None:
    plain, augmented, again = first_batch(images), first_batch(images, max_shift=2), first_batch(images, max_shift=2)
    assert np.array_equal(augmented[0], again[0])  # drawn from (seed, epoch, batch): the same after a resume
    assert np.array_equal(plain[1], augmented[1])  # the same images in the same order, labels untouched
    changed = [not np.array_equal(a, p) for a, p in zip(augmented[0].numpy(), plain[0].numpy(), strict=True)]
    assert 0.8 < np.mean(changed) < 1.0  # most images flipped or shifted (1/2 x 1/25 keep both unchanged)
    for a, p in zip(augmented[0].numpy(), plain[0].numpy(), strict=True):
        assert a.sum() <= p.sum() + 1e-3  # shifts move ink off the border, never add any; flips keep it


def test_label_smoothing_one_hot_labels_and_a_smoothed_cross_entropy(images) -> None:
    _, labels = first_batch(images, label_smoothing=0.1)
    assert labels.shape == (256, data.NUM_CLASSES) and np.all(labels.numpy().sum(axis=1) == 1)
    probabilities = np.full((1, 10), 0.05, dtype="float32")
    probabilities[0, 3] = 0.55
    target = np.eye(10, dtype="float32")[[3]]
    smoothed = 0.9 * target + 0.1 / 10  # 0.91 on the label, 0.01 on each other class
    expected = -float((smoothed * np.log(probabilities)).sum())
    assert float(training_loss(0.1)(target, probabilities)) == pytest.approx(expected, rel=1e-5)
    assert training_loss(0.0) == "sparse_categorical_crossentropy"


def test_a_run_with_every_option_records_them_and_validates_on_untouched_images(tmp_path, fashion_dir) -> None:
    options = ["trainer.precision=bfloat16", "optimizer.schedule=one_cycle", "data.augment=flip_shift",
               "model=cnn_bn", "model.filters=[8,16]", "trainer.epochs=2", "data.train_size=1000",
               "trainer.verbose=0"]  # fmt: skip
    proc = fashion_sweep(tmp_path, *options)
    assert proc.returncode == 0, proc.stderr
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["precision"] == "bfloat16"
    client = MlflowClient(store_uri(tmp_path / "mlruns"))
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]
    steps = math.ceil(900 / 128)
    schedule = learning_rate(0.001, "one_cycle", total_steps=2 * steps, warmup_fraction=0.3)
    assert lrs == pytest.approx([lr_at(schedule, steps), lr_at(schedule, 2 * steps)], rel=1e-5)  # lr per epoch

    # Validation saw the images as they are: the logged model scores the validation split to the logged val_loss
    # (and it is the trained network with Keras' own batch norm in place of the fused one).
    (logged,) = client.search_logged_models([run.info.experiment_id])
    network = mlflow.keras.load_model(logged.artifact_location).layers[-1]  # behind the raw-pixel input layers
    assert [type(layer).__name__ for layer in network.layers].count("BatchNormalization") == 5
    split = data.split(data.load(fashion_dir), 0.1, 1000, seed=42)
    probabilities = network.predict(split.x_val, batch_size=1024, verbose=0)
    val_loss = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(split.y_val, probabilities)))
    last = max(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step).value
    assert val_loss == pytest.approx(last, rel=2e-3)
