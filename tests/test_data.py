"""The data loader on the real Fashion-MNIST files: decoding, splitting, and what happens when files are bad."""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from fashion_sweep import data


def test_real_files_decode_to_the_published_shapes(fashion_dir: Path) -> None:
    ds = data.load(fashion_dir)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.uint8
    assert set(np.unique(ds.y_train)) == set(range(10)) == set(np.unique(ds.y_test))
    assert np.bincount(ds.y_train).tolist() == [6000] * 10  # Fashion-MNIST is balanced


def test_split_sizes_dtypes_and_scale(fashion_dir: Path) -> None:
    s = data.split(data.load(fashion_dir), val_fraction=0.1, train_size=None, seed=0)
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (54000, 6000, 10000)
    assert s.x_train.dtype == np.float32 and s.y_train.dtype == np.int32
    assert s.x_train.min() == 0.0 and s.x_train.max() == 1.0
    assert s.x_train.shape[1:] == data.IMAGE_SHAPE


def test_slice_and_validation_split_are_stratified_and_disjoint(fashion_dir: Path) -> None:
    ds = data.load(fashion_dir)
    s = data.split(ds, val_fraction=0.2, train_size=2000, seed=1)
    assert (len(s.y_train), len(s.y_val)) == (1600, 400)
    assert np.bincount(s.y_train, minlength=10).tolist() == [160] * 10
    assert np.bincount(s.y_val, minlength=10).tolist() == [40] * 10
    train_rows = {row.tobytes() for row in s.x_train}
    assert not any(row.tobytes() in train_rows for row in s.x_val)


def test_split_is_reproducible_with_a_seed_and_changes_with_another(fashion_dir: Path) -> None:
    ds = data.load(fashion_dir)
    a, b = (data.split(ds, 0.1, 1000, seed=7) for _ in range(2))
    c = data.split(ds, 0.1, 1000, seed=8)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.y_train, c.y_train)


def test_decoded_data_is_cached_per_process(fashion_dir: Path) -> None:
    assert data.load(fashion_dir) is data.load(fashion_dir)


def test_decoding_started_early_runs_on_its_own_thread_and_load_takes_its_result(
    fashion_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = data.decode(fashion_dir)
    data.load.cache_clear()
    with caplog.at_level("INFO", logger="fashion_sweep.data"):
        data.start_decoding(fashion_dir)  # as the app does before importing TensorFlow
        loaded = data.load(fashion_dir)
    decodes = [r for r in caplog.records if r.getMessage().startswith("Decoded Fashion-MNIST")]
    assert [r.threadName.startswith("decode") for r in decodes] == [True]  # once, and not on this thread
    assert np.array_equal(loaded.x_train, expected.x_train) and np.array_equal(loaded.y_test, expected.y_test)
    assert data.load(fashion_dir) is loaded


def test_jobs_with_one_data_setting_share_one_read_only_split(fashion_dir: Path) -> None:
    first, dataset = data.load_split(fashion_dir, 0.1, 1000, 3)
    assert data.load_split(fashion_dir, 0.1, 1000, 3)[0] is first and dataset is data.load(fashion_dir)
    assert data.load_split(fashion_dir, 0.1, 1000, 4)[0] is not first
    with pytest.raises(ValueError, match="read-only"):
        first.x_train[0, 0, 0, 0] = 1.0  # a job changing the shared images would change the next job's data


def copy_files(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in data.SHA256:
        shutil.copy(src / name, dst / name)
    return dst


def test_corrupt_file_is_a_clear_error_naming_it(fashion_dir: Path, tmp_path: Path) -> None:
    folder = copy_files(fashion_dir, tmp_path / "fm")
    with open(folder / "t10k-labels-idx1-ubyte.gz", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz is corrupt .*apt-get install"):
        data.locate(str(folder), None, None, None)


def test_missing_directory_and_missing_file_are_clear_errors(fashion_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=r"data.dir=.*nowhere is not a directory.*dataset-fashion-mnist"):
        data.locate(str(tmp_path / "nowhere"), None, None, None)
    folder = copy_files(fashion_dir, tmp_path / "fm")
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz is missing"):
        data.locate(str(folder), None, None, None)


def test_not_found_anywhere_without_url_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=r"not found in .*empty.*data.url is null"):
        data.locate(None, str(tmp_path / "empty"), str(tmp_path / "cache"), url=None)


def test_keras_cache_is_used_when_the_system_copy_is_absent(fashion_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    copy_files(fashion_dir, data.keras_cache_dir())
    assert data.locate(None, str(tmp_path / "no-system-copy"), None, url=None) == data.keras_cache_dir()


@contextlib.contextmanager
def serve(directory: Path):
    """A real HTTP server on 127.0.0.1 serving directory, standing in for the canonical source; yields its URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_fills_the_cache_with_checked_files(fashion_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serve(fashion_dir) as url:
        assert data.locate(None, str(tmp_path / "empty"), str(cache), url=url) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(data.SHA256)  # no .part files left behind


def test_download_of_wrong_bytes_leaves_nothing_behind(fashion_dir: Path, tmp_path: Path) -> None:
    mirror = copy_files(fashion_dir, tmp_path / "bad-mirror")
    (mirror / "train-labels-idx1-ubyte.gz").write_bytes(b"not the file")
    with (
        serve(mirror) as url,
        pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte.gz downloaded from .* is corrupt"),
    ):
        data.locate(None, None, str(tmp_path / "cache"), url=url)
    assert not any(p.name.startswith("train-labels") or p.suffix == ".part" for p in (tmp_path / "cache").iterdir())
