"""Picking a kernel body, preparing its inputs, and keeping CPU threads from oversubscribing.

Every kernel in this package has three bodies: `ref` (plain NumPy, the spec), `cpu` (Numba
`njit(parallel=True)`) and `gpu` (Numba CUDA kernels launched on CuPy arrays through
`__cuda_array_interface__`). `pick_body` chooses one: the `body=` argument wins, then the
environment variable `MINIVIT_KERNEL_BODY`, then the array type (CuPy -> gpu, NumPy -> cpu).

Small work stays on the calling thread: `cpu_kernel` compiles an elementwise or row-wise body
twice, threaded and serial, and `CpuKernel.body(elements)` picks the serial one below
`SERIAL_BELOW` elements. Waking the other threads for a parallel region costs more than such a
pass: with OpenBLAS bound (idle OpenMP threads sleep, see `backend`) a threaded LayerNorm of a
(197, 192) batch-1 ViT-Ti/16 activation took 77 us and the serial one 11 us; a bias add 60
against 4 us (2 cores of an AMD EPYC).

Threads: Numba's parallel regions and BLAS calls never run at the same time, except where
Numba's threads make the BLAS calls themselves: the attention bodies (one sgemm per head) and,
with OpenBLAS, every product of `kernels.matmul` (one block per thread). There the BLAS must run
one thread per caller, so the two cores see two threads, not four: where it is an OpenBLAS of its
own, not NumPy's, it runs one thread for good (`_blas.kernel_blas_single`); otherwise
`blas_single_thread()` limits it around the attention call (through threadpoolctl) and products
go to NumPy's threaded OpenBLAS instead. Numba itself uses `backend.num_threads()` threads, the
same count BLAS is given.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import types
from pathlib import Path

import numba
import numpy as np

from minivit import backend
from minivit.kernels import _blas

BODIES = ("ref", "cpu", "gpu")
BODY_ENV = "MINIVIT_KERNEL_BODY"
_BODY_KEY = getattr(os.environ, "encodekey", lambda key: key)(BODY_ENV)  # os.environ._data's form
# Below this many elements a `CpuKernel` runs its serial body (tests set 0 or a huge value to run
# each body). Measured on 2 cores with OpenBLAS bound, after a GEMM as in a step: at 38K-76K
# elements every serial body took 20-60% of the threaded one's time; at 151K the two were about
# even (LayerNorm forward 37 vs 86 us, cross-entropy forward 185 vs 145 us); at 605K threaded won.
SERIAL_BELOW = 1 << 17


class CpuKernel:
    """One Numba kernel body compiled twice: `threaded` (`parallel=True`: its `prange` loops are
    split over Numba's threads) and `serial` (`prange` runs as `range` on the calling thread).
    Both do the same arithmetic in the same order per element; a reduction over a `prange` loop
    (a sum) may round differently between the two.

    The serial body is compiled with NumPy's error model, as Numba compiles the body of every
    parallel region: under Python's, each float division checks its divisor for zero and raises,
    and that check keeps LLVM from vectorising the loop (a serial tanh-GELU ran 6.0 against 0.54
    ns per element)."""

    def __init__(self, fn, **flags):
        self.threaded = numba.njit(parallel=True, cache=True, **flags)(fn)
        # A renamed copy of the function: Numba's on-disk cache is keyed by the qualified name.
        twin = types.FunctionType(
            fn.__code__, fn.__globals__, f"{fn.__name__}_serial", fn.__defaults__, fn.__closure__
        )
        twin.__qualname__, twin.__module__ = f"{fn.__qualname__}_serial", fn.__module__
        self.serial = numba.njit(cache=True, **{"error_model": "numpy", **flags})(twin)

    def body(self, elements: int):
        """The compiled body for a pass over `elements` array elements."""
        return self.serial if elements < SERIAL_BELOW else self.threaded


def drop_stale_cache(package: Path = Path(__file__).parent) -> bool:
    """Delete the package's Numba cache files when any of its sources changed since they were
    written; returns whether it deleted them.

    Numba keys a cached function by the time stamp and size of the file that defines it, not
    of the files it inlines from, so after an edit of `_vecmath` or `_blas` (a `git pull`) the
    bodies in `attention.py` or `gelu.py` would go on loading code built from the old helpers.
    A SHA-256 of every `*.py` of the package, kept beside the cache in `__pycache__`, tells.
    Nothing happens where `__pycache__` cannot be written: Numba then caches elsewhere, and
    `NUMBA_CACHE_DIR` users clear their own directory.
    """
    digest = hashlib.sha256()
    for source in sorted(package.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    cache, want = package / "__pycache__", digest.hexdigest()
    stamp = cache / "minivit-sources.sha256"
    try:
        if stamp.read_text() == want:
            return False
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for stale in itertools.chain(cache.glob("*.nbi"), cache.glob("*.nbc")):
            stale.unlink(missing_ok=True)
        partial = cache / f"{stamp.name}.{os.getpid()}.tmp"
        partial.write_text(want)
        partial.replace(stamp)  # atomic: another process sees the old stamp or the new one
    except OSError:
        return False
    return True


def cpu_kernel(**flags):
    """Decorator: a `CpuKernel` from a Numba-compilable function (`flags` as for `numba.njit`)."""
    return lambda fn: CpuKernel(fn, **flags)


def _body_from_env() -> str | None:
    """$MINIVIT_KERNEL_BODY, or None when unset or empty, read afresh on every call (tests and
    users set it at run time). Read from `os.environ`'s own dict where it has one: the Mapping
    path (encode the key, look it up, decode) took 2.2 us, and a batch-1 Dense op asks twice."""
    data = getattr(os.environ, "_data", None)
    if data is None:
        return os.environ.get(BODY_ENV) or None
    raw = data.get(_BODY_KEY)
    return os.environ.decodevalue(raw) if raw else None


def pick_body(kernel: str, array, body: str | None) -> str:
    """Return the body to run: `body`, else $MINIVIT_KERNEL_BODY, else by the type of `array`."""
    choice = body if body is not None else _body_from_env()
    if choice is None:
        return "gpu" if backend.on_gpu(array) else "cpu"
    if choice not in BODIES:
        source = "body=" if body is not None else f"${BODY_ENV}"
        raise ValueError(
            f"{kernel}: {source}{choice!r} is not a kernel body; use one of {', '.join(BODIES)}"
        )
    if choice == "cpu" and backend.on_gpu(array):
        raise ValueError(f"{kernel}: the cpu body needs NumPy arrays; move them with to_host()")
    return choice


def fusable(*arrays) -> bool:
    """True when the fused kernels apply: every array is float32.

    The ops layer calls the kernels for float32 (the dtype of training and inference) and keeps
    its plain array code for other dtypes, which the float64 gradient checks use.
    """
    return all(a.dtype == np.float32 for a in arrays)


def float32_rows(xp, *arrays) -> list:
    """Each array as a C-contiguous float32 array of module `xp` (no copy when already so)."""
    return [xp.ascontiguousarray(a, dtype=np.float32) for a in arrays]


def check_2d(kernel: str, name: str, array) -> None:
    """Raise a one-sentence error unless `array` is 2-D (rows, features)."""
    if array.ndim != 2:
        raise ValueError(
            f"{kernel}: {name} must be 2-D (rows, features) but has shape {tuple(array.shape)}; "
            "reshape it to (-1, last_axis) first"
        )


@functools.cache
def cpu_ready() -> None:
    """Set Numba's thread count once per process: the cores minivit may use."""
    numba.set_num_threads(max(1, min(backend.num_threads(), numba.config.NUMBA_NUM_THREADS)))


@contextlib.contextmanager
def blas_single_thread():
    """Limit BLAS to one thread per caller while Numba threads call it.

    Without threadpoolctl this does nothing: results are the same, but BLAS may then start its
    own threads inside each Numba thread and oversubscribe the cores.
    """
    controller = _blas.controller()
    if controller is None or _blas.kernel_blas_single():  # nothing to limit: see _blas
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def blocks(n: int, threads: int) -> int:
    """Number of blocks of `threads` that cover `n` items (at least one)."""
    return max(1, -(-n // threads))
