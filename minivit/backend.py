"""Which array module an array lives in, where it lives, and the float32 policy.

minivit computes in float32 everywhere. Arrays are NumPy arrays on the CPU and CuPy arrays on a
GPU; code above this layer asks `xp_of(array)` for the module and never imports cupy itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

DTYPE = np.float32  # the one floating dtype of parameters, activations and gradients

BLAS_ENV = "MINIVIT_BLAS"
BLAS_LIBRARIES = ("mkl", "openblas")


def cpu_vendor() -> str:
    """The `vendor_id` of /proc/cpuinfo (`GenuineIntel`, `AuthenticAMD`), or '' when unknown."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def find_mkl() -> str | None:
    """Path of MKL's single dynamic library `libmkl_rt`, or None when MKL is not installed."""
    here = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    return here[0] if here else ctypes.util.find_library("mkl_rt")


def blas_choice() -> tuple[str, str | None]:
    """The BLAS library minivit's GEMMs call, and MKL's path when that is MKL.

    `$MINIVIT_BLAS` (mkl or openblas) decides; otherwise MKL where it is installed and the CPU is
    Intel's (`kernels/_blas.py` says why), else OpenBLAS.
    """
    choice = os.environ.get(BLAS_ENV, "").strip().lower() or None
    if choice is not None and choice not in BLAS_LIBRARIES:
        raise ValueError(f"${BLAS_ENV}={choice!r} is not a BLAS library; use mkl or openblas")
    mkl_path = find_mkl() if choice != "openblas" else None
    if choice == "mkl" and mkl_path is None:
        raise RuntimeError(
            f"${BLAS_ENV}=mkl but MKL's libmkl_rt is not installed; "
            f"pip install 'minivit[mkl]' or unset {BLAS_ENV}"
        )
    if mkl_path is not None and (choice == "mkl" or cpu_vendor() == "GenuineIntel"):
        return "mkl", mkl_path
    return "openblas", None


def openmp_wait_policy(products_on_numpy_threads: bool) -> None:
    """Let idle OpenMP threads sleep at once where NumPy's own OpenBLAS threads run the products;
    elsewhere keep libgomp's default, a short spin after each parallel region.

    `kernels._blas` calls this when it has bound the GEMM library, before any parallel region
    starts the OpenMP runtime (which reads the variable once); an OMP_WAIT_POLICY already in the
    environment is kept.

    - Products on NumPy's threaded OpenBLAS (where NumPy and SciPy share one library): Numba's
      OpenMP threads and OpenBLAS's own take turns on the same cores, and an OpenMP thread that
      spins after its region steals the core from the BLAS call that follows: a ViT-S/16 batch-1
      forward ran 10x slower (2.5 vs 25 img/s on 2 cores), so they must sleep.
    - MKL on GNU OpenMP, or OpenBLAS cut over Numba's threads (`kernels.gemm`): kernels and
      products run on one pool of threads, and the spin keeps it ready between back-to-back
      calls. With MKL, sleeping made ViT-Ti/16 batch-1 inference 43 instead of 28 ms and an
      R26+S/32 training step at batch 32 7.8 instead of 5.9 s. The price: a NumPy product of the
      caller's own right after a minivit kernel shares the cores with that spin for a moment.
    """
    if products_on_numpy_threads:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameter numbers from glibc's malloc.h


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the kernel.

    By default glibc maps every allocation above 32 MiB afresh with mmap and unmaps it on free,
    so each activation, column matrix and gradient of a training step is page-faulted and zeroed
    by the kernel again in every step: a third of an R26+S/32 step at batch 32 on 2 cores went
    to the kernel (6 s of 18 s), and the step ran 1.6x faster without it (3.65 vs 5.9 s; ViT-S/16
    3.35 vs 4.3 s) at the same peak resident memory. With no mmap and no trimming, the process
    keeps its peak heap until it exits, as PyTorch's caching allocator does on a GPU.

    Called once when minivit is imported, on Linux with glibc; `MINIVIT_MALLOC=system` in the
    environment keeps glibc's defaults. Returns whether the policy was applied.
    """
    if os.environ.get("MINIVIT_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc only; musl has no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 reaches glibc as SIZE_MAX (its setter takes a size_t): never trim the heap top
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


MALLOC_TUNED = keep_freed_memory()


def cupy_module():
    """Return the cupy module, or None when it is not installed or no GPU is visible."""
    try:
        import cupy  # noqa: PLC0415  (optional extra, imported lazily)
    except ImportError:
        return None
    return cupy


_HOST = (np.ndarray, np.generic)


def xp_of(array) -> object:
    """Return the array module (numpy or cupy) that owns `array`."""
    if isinstance(array, _HOST) or not hasattr(array, "__cuda_array_interface__"):
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
