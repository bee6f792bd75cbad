"""Which array module an array lives in, where it lives, and the float32 policy.

minivit computes in float32 everywhere. Arrays are NumPy arrays on the CPU and CuPy arrays on a
GPU; code above this layer asks `xp_of(array)` for the module and never imports cupy itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

DTYPE = np.float32  # the one floating dtype of parameters, activations and gradients

# Numba's OpenMP threads and OpenBLAS's threads take turns on the same cores. By default an idle
# OpenMP thread spins for a while after each parallel region, stealing the core from the BLAS
# call that follows: a ViT-S/16 batch-1 forward ran 10x slower (2.5 vs 25 img/s on 2 cores).
# Idle OpenMP threads must sleep instead; set before Numba loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cupy_module():
    """Return the cupy module, or None when it is not installed or no GPU is visible."""
    try:
        import cupy  # noqa: PLC0415  (optional extra, imported lazily)
    except ImportError:
        return None
    return cupy


def xp_of(array) -> object:
    """Return the array module (numpy or cupy) that owns `array`."""
    if isinstance(array, np.ndarray | np.generic) or not hasattr(array, "__cuda_array_interface__"):
        return np
    cp = cupy_module()
    return cp if cp is not None and isinstance(array, cp.ndarray) else np


def on_gpu(array) -> bool:
    """True when `array` is a GPU (CuPy) array."""
    return xp_of(array) is not np


@dataclass(frozen=True)
class Device:
    """A place for arrays: `cpu` or `cuda:N`."""

    kind: str  # "cpu" or "cuda"
    index: int = 0  # GPU ordinal for "cuda"

    @classmethod
    def parse(cls, spec: str | Device | None) -> Device:
        """Read `cpu`, `cuda`, `cuda:N` (or a Device) into a Device."""
        if spec is None:
            return cls("cpu")
        if isinstance(spec, Device):
            return spec
        match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", spec.strip().lower())
        if match is None:
            raise ValueError(f"unknown device {spec!r}; use 'cpu', 'cuda' or 'cuda:N'")
        return cls(match.group(1), int(match.group(2) or 0))

    @property
    def xp(self):
        """The array module of this device."""
        if self.kind == "cpu":
            return np
        cp = cupy_module()
        if cp is None:
            raise RuntimeError(
                f"device {self} needs CuPy; install it with pip install 'minivit[gpu]'"
            )
        return cp

    def put(self, array) -> object:
        """Copy `array` to this device (no copy when it is already there)."""
        if self.kind == "cpu":
            return to_host(array)
        cp = self.xp
        with cp.cuda.Device(self.index):
            return cp.asarray(array)

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def to_host(array) -> np.ndarray:
    """Return `array` as a NumPy array (a device-to-host copy for CuPy arrays)."""
    if on_gpu(array):
        return array.get()
    return np.asarray(array)


def as_float(array, xp=np):
    """`array` as a float32 array of module `xp`; integer and float64 inputs are converted."""
    array = xp.asarray(array)
    return array if array.dtype == DTYPE else array.astype(DTYPE)


def num_threads() -> int:
    """Threads minivit's own kernels may use: NUMBA_NUM_THREADS, else the cores we may run on."""
    if "NUMBA_NUM_THREADS" in os.environ:
        return int(os.environ["NUMBA_NUM_THREADS"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
