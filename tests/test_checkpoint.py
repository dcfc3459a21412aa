"""What makes a continued run equal to an uninterrupted one: the checkpoint and the per-epoch data order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from fashion_sweep import checkpoint, data
from fashion_sweep.models import seed_cnn
from fashion_sweep.pipeline import training_batches
from fashion_sweep.resume import split_args


@pytest.fixture(scope="module")
def images(fashion_dir: Path) -> data.Split:
    return data.split(data.load(fashion_dir), val_fraction=0.1, train_size=500, seed=0)


def trained_model(images: data.Split) -> keras.Model:
    keras.backend.clear_session()  # as a training run does: variable paths (the checkpoint's keys) restart from zero
    keras.utils.set_random_seed(1)
    model = seed_cnn([8], 0.25, 16, 0.3)
    model.compile(optimizer=keras.optimizers.RMSprop(0.001), loss="sparse_categorical_crossentropy")
    model.fit(images.x_train[:256], images.y_train[:256], batch_size=64, epochs=1, verbose=0)
    return model


def test_checkpoint_round_trip_restores_weights_optimizer_slots_and_dropout_seed(tmp_path: Path, images) -> None:
    model = trained_model(images)
    state = checkpoint.capture(model, 1, {"loss": [0.5]}, 2.0)
    assert any("seed_generator" in name for name in state.variables)  # Dropout's random state travels along
    assert any(name.endswith("iteration") for name in state.variables)  # so does the optimizer's step count
    digest = checkpoint.save(state, tmp_path / "c.npz")
    loaded = checkpoint.load(tmp_path / "c.npz", digest)
    assert (loaded.epoch, loaded.history, loaded.fit_seconds) == (1, {"loss": [0.5]}, 2.0)

    keras.backend.clear_session()
    keras.utils.set_random_seed(2)  # another initialisation, overwritten by the restore
    fresh = seed_cnn([8], 0.25, 16, 0.3)
    fresh.compile(optimizer=keras.optimizers.RMSprop(0.001), loss="sparse_categorical_crossentropy")
    checkpoint.restore(fresh, loaded)
    for name, variable in checkpoint.variables_of(fresh).items():
        assert np.array_equal(keras.ops.convert_to_numpy(variable), state.variables[name]), name


def test_damaged_or_foreign_checkpoint_is_refused(tmp_path: Path, images) -> None:
    model = trained_model(images)
    digest = checkpoint.save(checkpoint.capture(model, 1, {}, 0.0), tmp_path / "c.npz")
    raw = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(raw[: len(raw) // 2])  # a write cut short
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.load(tmp_path / "c.npz", digest)
    (tmp_path / "c.npz").write_bytes(raw)
    keras.backend.clear_session()
    other = seed_cnn([8, 8], 0.25, 16, 0.3)
    other.compile(optimizer=keras.optimizers.RMSprop(0.001), loss="sparse_categorical_crossentropy")
    with pytest.raises(checkpoint.CheckpointError, match="other variables"):
        checkpoint.restore(other, checkpoint.load(tmp_path / "c.npz", digest))


def labels_per_epoch(dataset, steps: int) -> list[np.ndarray]:
    batches = [y.numpy() for _, y in dataset]
    return [np.concatenate(batches[i : i + steps]) for i in range(0, len(batches), steps)]


def test_each_epochs_order_depends_on_seed_and_epoch_alone(images) -> None:
    x, y = images.x_train, images.y_train
    steps = -(-len(y) // 128)
    whole = labels_per_epoch(training_batches(x, y, 128, 42, 0, 3), steps)
    continued = labels_per_epoch(training_batches(x, y, 128, 42, 1, 3), steps)
    assert len(whole) == 3 and len(continued) == 2
    assert all(np.array_equal(a, b) for a, b in zip(whole[1:], continued, strict=True))  # a resume sees the same
    assert all(sorted(epoch.tolist()) == sorted(y.tolist()) for epoch in whole)  # every image once per epoch
    assert not np.array_equal(whole[0], whole[1])  # reshuffled each epoch
    other_seed = labels_per_epoch(training_batches(x, y, 128, 7, 0, 1), steps)
    assert not np.array_equal(whole[0], other_seed[0])


def test_training_batches_are_not_autotuned(images) -> None:
    # TensorFlow 2.21: deleting an autotuned iterator waited up to 60 s for the tuner thread after the last epoch
    options = training_batches(images.x_train, images.y_train, 128, 42, 0, 1).options()
    assert options.autotune.enabled is False


def test_resume_takes_a_target_and_only_hydra_overrides() -> None:
    assert split_args(["abc123", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]) == (
        "abc123", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])  # fmt: skip
    assert split_args(["seed_cnn rmsprop lr=0.001"]) == ("seed_cnn rmsprop lr=0.001", [])  # a run name
    with pytest.raises(SystemExit, match="would change the jobs"):
        split_args(["trainer.epochs=30"])


def test_help_imports_neither_tensorflow_nor_mlflow() -> None:
    code = (
        "import sys; sys.argv = ['fashion-sweep', '--help']\n"
        "from fashion_sweep.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'mlflow'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]"
