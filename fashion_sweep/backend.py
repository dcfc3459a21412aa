"""The TensorFlow runtime under Keras: imported once, quietly, by the jobs that train, in the precision they train in.

Owns TensorFlow's start-up (what it prints, what its import pulls in) and the precision (policy, choice per CPU;
the fix to TensorFlow's bfloat16 bias gradients is tf_internals.py's); it does not build, train or log anything.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


@contextmanager
def sklearn_hidden() -> Iterator[None]:
    """While inside, `import sklearn` fails as if it were not installed; afterwards it imports as usual."""
    if "sklearn" in sys.modules:
        yield
        return
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # None in sys.modules: the import raises ImportError
    try:
        yield
    finally:
        if "sklearn" in sys.modules and sys.modules["sklearn"] is None:
            del sys.modules["sklearn"]


def import_tensorflow() -> None:
    """Import TensorFlow and let it find its devices (where CUDA is probed), hiding only known start-up noise."""
    if "tensorflow" in sys.modules:
        return
    noise = ALWAYS_NOISE if has_nvidia_gpu() else re.compile(f"{ALWAYS_NOISE.pattern}|{CUDA_NOISE.pattern}")
    # Keras 3.15 imports scikit-learn (installed for MLflow) at its own import, for wrappers we do not use: 0.7-1.0 s
    # per process (AMD EPYC); TensorFlow 2.21's import imports Keras.
    with filtered_stderr(noise), sklearn_hidden():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe happens here, inside the filter


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags, as Linux lists them (empty where there is no /proc/cpuinfo)."""
    return set(cpuinfo_field("flags", cpuinfo).split())


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vendor as Linux names it (AuthenticAMD, GenuineIntel), or "" where there is no /proc/cpuinfo."""
    return cpuinfo_field("vendor_id", cpuinfo)


def cpuinfo_field(name: str, cpuinfo: Path) -> str:
    """The value of the first `name : value` line of /proc/cpuinfo ("" if there is none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def choose_precision(setting: str, flags: set[str], vendor: str, isa_cap: str = "") -> tuple[str, str]:
    """(precision, why) for trainer.precision: float32 and bfloat16 as asked; auto = bfloat16 only where it was
    measured faster. Mixed bfloat16 against float32, seed_cnn: 1.92x and 1.41x on Intel Xeons with AMX; 1.45x
    (1.08x once) on an AMD EPYC with AVX512_BF16; 0.84x and 0.74x on an Intel Xeon with AVX512_BF16 whose AMX is
    not exposed (whole default runs, 2026-12-02); 0.23x on an AMD EPYC without AVX512_BF16 (bfloat16 emulated).
    isa_cap is ONEDNN_MAX_CPU_ISA: oneDNN then uses no instruction above it, so auto chooses as on such a CPU."""
    if setting != "auto":
        return setting, "asked for"
    flags = flags_under_cap(flags, isa_cap)
    capped = f" under ONEDNN_MAX_CPU_ISA={isa_cap}" if isa_cap else ""
    if "amx_bf16" in flags:
        return "bfloat16", f"auto: this CPU has AMX (amx_bf16){capped}"
    if "avx512_bf16" not in flags:
        cpu = f"oneDNN{capped}" if isa_cap else "this CPU"  # the CPU may have them; the cap keeps them unused
        return "float32", f"auto: {cpu} has no bfloat16 instructions (no avx512_bf16)"
    if vendor == "AuthenticAMD":
        return (
            "bfloat16",
            f"auto: an AMD CPU with bfloat16 instructions (avx512_bf16){capped}, measured faster in bfloat16",
        )
    return (
        "float32",
        f"auto: avx512_bf16 without AMX ({vendor or 'vendor unknown'}){capped}, slower in bfloat16 on Intel",
    )


def flags_under_cap(flags: set[str], isa_cap: str) -> set[str]:
    """The CPU flags oneDNN may use under ONEDNN_MAX_CPU_ISA (oneDNN 3's names, e.g. AVX2, AVX512_CORE_BF16,
    AVX512_CORE_AMX; unset, ALL or DEFAULT: no cap): AMX only under an AMX cap, AVX512_BF16 only under a cap
    that includes it."""
    cap = isa_cap.upper()
    if cap in ("", "ALL", "DEFAULT"):
        return flags
    kept = set(flags)
    if "AMX" not in cap:
        kept -= {"amx_bf16", "amx_tile", "amx_int8", "amx_fp16"}
    if not any(name in cap for name in ("BF16", "FP16", "AMX", "AVX10")):
        kept.discard("avx512_bf16")
    return kept


def precision_here(setting: str) -> tuple[str, str]:
    """(precision, why) for trainer.precision on this machine's CPU, under oneDNN's ISA cap if one is set."""
    return choose_precision(setting, cpu_flags(), cpu_vendor(), os.environ.get("ONEDNN_MAX_CPU_ISA", ""))


def by_precision(setting: str, bfloat16: Any, float32: Any) -> Any:
    """The config resolver ${by_precision:<trainer.precision>,<value in bfloat16>,<value in float32>}: a preset's
    value for the precision that setting trains in here (experiment=best_cnn's two recipes)."""
    return bfloat16 if precision_here(setting)[0] == "bfloat16" else float32


def set_precision(precision: str) -> None:
    """Keras' global dtype policy for a precision: float32, or bfloat16 = mixed_bfloat16 (float32 weights) with
    bias gradients summed in float32."""
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    if precision == "bfloat16":
        from fashion_sweep import tf_internals  # TensorFlow: this module is imported before it

        tf_internals.sum_bfloat16_bias_gradients_in_float32()
