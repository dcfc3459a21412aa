"""Fashion-MNIST: find the four IDX files, check them, decode them, split them.

Owns where the data comes from and how it is split; it knows nothing of models, training or MLflow.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28, 1)

# SHA-256 of the original files as Zalando published them (the same bytes Debian and Keras ship).
SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist` or set data.dir to a folder holding the four files"
)


class DataError(Exception):
    """The data is missing or corrupt; the message says which file and how to get it."""


@dataclass(frozen=True)
class FashionMNIST:
    """The decoded dataset: uint8 images (n, 28, 28, 1) and uint8 labels (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: Path


@dataclass(frozen=True)
class Split:
    """Float images in [0, 1] and integer labels, ready for model.fit."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def keras_cache_dir() -> Path:
    """Where keras.datasets.fashion_mnist keeps its copy."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(keras_home) / "datasets" / "fashion-mnist"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_all_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in SHA256)


def verify(folder: Path) -> None:
    """Raise DataError unless all four files are in folder with the published SHA-256."""
    for name, expected in SHA256.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing; {HOW_TO_GET}")
        if sha256(path) != expected:
            raise DataError(f"{path} is corrupt (SHA-256 differs from the published file); delete it and {HOW_TO_GET}")


def download(url: str, folder: Path) -> None:
    """Fetch the four files from url into folder; each lands whole, checked, or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, expected in SHA256.items():
        if (folder / name).is_file():
            continue
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".part", delete=False) as part:
            try:
                with urllib.request.urlopen(url.rstrip("/") + "/" + name, timeout=60) as response:
                    shutil.copyfileobj(response, part)
            except OSError as err:
                os.unlink(part.name)
                raise DataError(f"could not download {name} from {url}: {err}; {HOW_TO_GET}") from None
        if sha256(Path(part.name)) != expected:
            os.unlink(part.name)
            raise DataError(f"{name} downloaded from {url} is corrupt (SHA-256 differs); {HOW_TO_GET}")
        os.replace(part.name, folder / name)


def locate(data_dir: str | None, system_dir: str | None, cache_dir: str | None, url: str | None) -> Path:
    """The folder holding verified files: data.dir if set, else the system copy, Keras' cache, a download."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.dir={data_dir} is not a directory; {HOW_TO_GET}")
        verify(folder)
        return folder
    cache = Path(cache_dir).expanduser() if cache_dir else keras_cache_dir()
    places = [Path(system_dir), cache] if system_dir else [cache]
    for folder in places:
        if has_all_files(folder):
            verify(folder)
            return folder
    if url is None:
        raise DataError(
            f"Fashion-MNIST not found in {' or '.join(map(str, places))} and data.url is null; {HOW_TO_GET}"
        )
    download(url, cache)
    verify(cache)
    return cache


@functools.lru_cache(maxsize=4)
def locate_once(data_dir: str | None, system_dir: str | None, cache_dir: str | None, url: str | None) -> Path:
    """locate(), checked once per process: a launch verifies the files before its first job, its jobs reuse that."""
    return locate(data_dir, system_dir, cache_dir, url)


def read_idx(path: Path) -> np.ndarray:
    """Decode one gzipped IDX file of unsigned bytes into an array of the shape its header gives."""
    raw = gzip.decompress(path.read_bytes())  # one zlib call, which releases the GIL (see start_decoding)
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def decode(folder: Path) -> FashionMNIST:
    """The four files in folder, decoded."""
    started = time.perf_counter()
    dataset = FashionMNIST(
        x_train=read_idx(folder / "train-images-idx3-ubyte.gz")[..., None],
        y_train=read_idx(folder / "train-labels-idx1-ubyte.gz"),
        x_test=read_idx(folder / "t10k-images-idx3-ubyte.gz")[..., None],
        y_test=read_idx(folder / "t10k-labels-idx1-ubyte.gz"),
        source=folder,
    )
    log.info("Decoded Fashion-MNIST from %s in %.1f s", folder, time.perf_counter() - started)
    return dataset


_decoding: dict[Path, Future[FashionMNIST]] = {}  # start_decoding's work, taken by load()


def start_decoding(folder: Path) -> None:
    """Decode folder's files in a background thread while the caller goes on (importing TensorFlow takes ~5 s,
    decoding ~0.4 s; the file reads and zlib release the GIL, so the two overlap); load() waits for it."""
    if folder not in _decoding:
        _decoding[folder] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode").submit(decode, folder)


@functools.lru_cache(maxsize=2)
def load(folder: Path) -> FashionMNIST:
    """The decoded files of folder; cached, so jobs of a sweep in one process decode them once."""
    future = _decoding.pop(folder, None)
    return future.result() if future is not None else decode(folder)


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shuffled order of indices in which every prefix holds each class in its overall proportion."""
    position = np.empty(len(labels))
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(position, kind="stable")


def split(data: FashionMNIST, val_fraction: float, train_size: int | None, seed: int) -> Split:
    """Take a stratified slice of train_size training images (all if None), hold out val_fraction of it."""
    rng = np.random.default_rng(seed)
    pool = stratified_order(data.y_train, rng)[:train_size]
    pool = pool[stratified_order(data.y_train[pool], rng)]
    n_val = round(val_fraction * len(pool))
    val, train = pool[:n_val], pool[n_val:]

    def scale(images: np.ndarray) -> np.ndarray:
        return read_only(images.astype(np.float32) / 255.0)

    return Split(
        x_train=scale(data.x_train[train]),
        y_train=read_only(data.y_train[train].astype(np.int32)),
        x_val=scale(data.x_train[val]),
        y_val=read_only(data.y_train[val].astype(np.int32)),
        x_test=scale(data.x_test),
        y_test=read_only(data.y_test.astype(np.int32)),
    )


def read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # a split is shared by the jobs of a sweep (load_split): none may change it
    return array


@functools.lru_cache(maxsize=1)
def load_split(folder: Path, val_fraction: float, train_size: int | None, seed: int) -> tuple[Split, FashionMNIST]:
    """split(load(folder), ...), cached: the jobs of a learning-rate sweep in one process share one split
    (making it costs ~0.3 s per job on all the data)."""
    dataset = load(folder)
    return split(dataset, val_fraction, train_size, seed), dataset


def split_for(cfg: Any) -> tuple[Split, FashionMNIST]:
    """The split a run's config asks for (conf/data and trainer.seed): located and verified once per process,
    decoded once, split once per setting."""
    folder = locate_once(cfg.data.dir, cfg.data.system_dir, cfg.data.cache_dir, cfg.data.url)
    return load_split(folder, cfg.data.val_fraction, cfg.data.train_size, cfg.trainer.seed)
