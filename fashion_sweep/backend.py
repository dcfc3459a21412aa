"""The TensorFlow runtime under Keras: imported once, quietly, by the jobs that train.

Owns what TensorFlow prints at start-up; it does not build, train or log anything.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Start-up lines TensorFlow 2.21 writes to stderr before absl logging is initialised, so that
# TF_CPP_MIN_LOG_LEVEL does not hide them (tensorflow/tensorflow#100442).
ALWAYS_NOISE = re.compile(r"All log messages before absl::InitializeLog|oneDNN custom operations are on")
# The same, about CUDA: noise on a machine without an NVIDIA GPU, worth seeing on one with a GPU.
CUDA_NOISE = re.compile(r"cudart_stub|failed call to cuInit|Could not find cuda drivers|register cu\w+ factory")


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is loaded (the condition under which TensorFlow can use a GPU at all)."""
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


@contextmanager
def filtered_stderr(noise: re.Pattern[str]) -> Iterator[None]:
    """Capture file descriptor 2 (C++ and Python alike); on exit write back every line that is not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines() if not noise.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def import_tensorflow() -> None:
    """Import TensorFlow and let it find its devices (where CUDA is probed), hiding only known start-up noise."""
    if "tensorflow" in sys.modules:
        return
    noise = ALWAYS_NOISE if has_nvidia_gpu() else re.compile(f"{ALWAYS_NOISE.pattern}|{CUDA_NOISE.pattern}")
    with filtered_stderr(noise):
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe happens here, inside the filter


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags, as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def choose_precision(setting: str, flags: set[str]) -> tuple[str, str]:
    """(precision, why) for trainer.precision: float32 and bfloat16 as asked; auto = bfloat16 where the CPU has
    bfloat16 instructions (avx512_bf16; CPUs with AMX have them too), float32 elsewhere. Measured, mixed bfloat16
    against float32 (seed_cnn, options benchmark): 1.92x and 1.41x on Intel Xeons with AMX, 1.45x on an AMD
    EPYC with AVX512_BF16 (1.08x once before), 0.23x on an AMD EPYC without it (bfloat16 emulated)."""
    if setting != "auto":
        return setting, "asked for"
    if "amx_bf16" in flags:
        return "bfloat16", "auto: this CPU has AMX (amx_bf16)"
    if "avx512_bf16" in flags:
        return "bfloat16", "auto: this CPU has bfloat16 instructions (avx512_bf16)"
    return "float32", "auto: this CPU has no bfloat16 instructions (no avx512_bf16)"
