"""Single-precision GEMM callable from Numba code, on strided row-major blocks, and which BLAS
library provides it.

Numba's `np.dot` takes only contiguous 2-D arrays (it copies anything else), allocates its
result, and cannot accumulate or scale. The attention bodies need all three on heads that are
strided views of the flax (B, N, NH, K) layout, and `kernels.gemm` wants them for the products of
Dense and Conv layers, so both call Fortran `sgemm` themselves. The call is emitted by name
(`minivit_sgemm`) and the name is bound to a library's address when this module loads, so the
functions that use it stay in Numba's on-disk cache whichever library is bound.

The library (`LIBRARY`): Intel MKL (`pip install 'minivit[mkl]'`, the `libmkl_rt` of the `mkl`
wheel) on an Intel CPU, where its sgemm runs 10-40% faster than OpenBLAS on ViT shapes (2 cores
of a Xeon: 230-280 against 170-200 GFLOP/s); otherwise OpenBLAS: the build of the
`scipy-openblas32` wheel (a dependency; the OpenBLAS NumPy and SciPy bundle, published on its own
and newer than the copy inside SciPy's wheel), opened privately so that its symbols do not
replace SciPy's, or where that wheel is missing, the OpenBLAS SciPy exports for Cython
(`scipy.linalg.cython_blas`, the library Numba's own `np.dot` uses). The version matters for
weight gradients (`x.T @ g`, a long inner axis and a narrow result): on 2 AMD EPYC Zen 4 cores
OpenBLAS 0.3.34 ran them at 92-153 GFLOP/s where SciPy 1.17's 0.3.30 ran 53-140 (R26+S/32 and
ViT-Ti/16 shapes at batch 32), and a ViT-Ti/16 training step at batch 32 took 1.89-1.99 instead
of 2.29-2.34 s (2 alternating pairs of processes). On AMD CPUs MKL is not
used by default: PyTorch's MKL ran at 189 GFLOP/s there against OpenBLAS's 410 (2 Zen 5 cores).
`MINIVIT_BLAS=mkl|openblas` overrides the choice. MKL runs its threads on GNU OpenMP
(`MKL_THREADING_LAYER=GNU` unless set), the runtime Numba's parallel regions use, so the two
share one pool of threads instead of competing for the cores (see `backend` for their wait
policy).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

import numba
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic

from minivit import backend

_SYMBOL = "minivit_sgemm"
N, T = ord("N"), ord("T")


def _load_mkl(path: str) -> ctypes.CDLL:
    """Open libmkl_rt on GNU OpenMP with minivit's thread count (unless the environment says)."""
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
    mkl = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    if "MKL_NUM_THREADS" not in os.environ:
        mkl.MKL_Set_Num_Threads(ctypes.c_int(backend.num_threads()))
    return mkl


def wheel_openblas() -> Path | None:
    """The shared library of the `scipy-openblas32` wheel, or None where it is not installed.
    Found without importing the package, whose import loads the library into the global
    namespace, where its `scipy_`-prefixed symbols could stand in for those of SciPy's own copy."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    found = sorted(lib_dir.glob("libscipy_openblas*")) + sorted(lib_dir.glob("*openblas*.dll"))
    return next((path for path in found if path.is_file()), None)


_WHEEL_HANDLES = []  # the opened wheel library, kept for the life of the process


def _openblas_sgemm() -> int:
    """The address of OpenBLAS's sgemm: the wheel's (`wheel_openblas`), else SciPy's."""
    path = wheel_openblas()
    if path is not None:
        try:
            handle = ctypes.CDLL(str(path))  # RTLD_LOCAL: its symbols stay its own
            sgemm = handle.scipy_sgemm_
        except (OSError, AttributeError):  # a broken install: SciPy's copy still works
            pass
        else:
            _WHEEL_HANDLES.append(handle)
            return ctypes.cast(sgemm, ctypes.c_void_p).value
    return get_cython_function_address("scipy.linalg.cython_blas", "sgemm")


def _choose() -> tuple[str, int]:
    """The library to bind (`backend.blas_choice`) and the address of its sgemm."""
    library, mkl_path = backend.blas_choice()
    if library == "mkl":
        return library, ctypes.cast(_load_mkl(mkl_path).sgemm, ctypes.c_void_p).value
    return library, _openblas_sgemm()


LIBRARY, _ADDRESS = _choose()
binding.add_symbol(_SYMBOL, _ADDRESS)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _library_of(address: int) -> str | None:
    """The path of the shared library holding `address` (glibc's dladdr), or None."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    info = _DlInfo()
    if not dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(info.dli_fname))


def _blas_library_path() -> str | None:
    """The OpenBLAS whose sgemm is bound: the library holding the bound address when that is
    OpenBLAS itself (the wheel's), else the one that a lookup of the Fortran `sgemm` from the
    module holding it finds (SciPy's Cython wrapper module, then what it links)."""
    module = _library_of(_ADDRESS)
    if module is None:
        return None
    linked = ctypes.CDLL(module)
    for name in ("scipy_sgemm_", "sgemm_"):  # SciPy's wheels prefix the bundled OpenBLAS
        function = getattr(linked, name, None)
        if function is not None:
            return _library_of(ctypes.cast(function, ctypes.c_void_p).value)
    return None


@functools.cache
def controller():
    """threadpoolctl's controller of the BLAS libraries loaded in this process, built once (a
    scan of them takes a few milliseconds), or None without threadpoolctl. SciPy's OpenBLAS is
    loaded first: the kernels' sgemm may be its."""
    try:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415
    except ImportError:
        return None
    import scipy.linalg.cython_blas  # noqa: F401, PLC0415

    return ThreadpoolController()


def _pin_kernel_openblas():
    """Give the OpenBLAS behind the kernels' sgemm one thread for good, when it is a library of
    its own (the `scipy-openblas32` wheel's or the copy in SciPy's wheel; NumPy's wheel bundles
    another), and return its threadpoolctl controller.

    That library then serves only calls from inside Numba's threads (the attention bodies), so
    it needs no threads of its own, and `_dispatch.blas_single_thread` need not set and restore
    the count around every call: on 2 AMD cores each toggle cost about 65 us with the GEMM after
    it, 8% of a ViT-Ti/16 or ViT-S/16 batch-1 forward. Where NumPy and SciPy share one OpenBLAS
    (some system builds), nothing is pinned and the toggle stays. Returns None then, or when the
    library cannot be told apart.
    """
    path = _blas_library_path() if LIBRARY == "openblas" else None
    if path is None or controller() is None:
        return None
    blas = controller().select(user_api="blas").lib_controllers
    own = [lib for lib in blas if os.path.realpath(lib.filepath) == path]
    others = [lib for lib in blas if os.path.realpath(lib.filepath) != path]
    if len(own) != 1 or not others:
        return None
    own[0].set_num_threads(1)
    return own[0]


_KERNEL_BLAS = _pin_kernel_openblas()


def kernel_blas_single() -> bool:
    """True when the kernels' sgemm library runs one thread now (pinned, and not raised since
    by a caller's threadpoolctl limit)."""
    return _KERNEL_BLAS is not None and _KERNEL_BLAS.get_num_threads() == 1


def products_on_numpy_threads() -> bool:
    """True where `kernels.matmul` hands float32 products to NumPy's threaded OpenBLAS: OpenBLAS
    is bound and the kernels' copy of it is not one single-threaded library of its own."""
    return LIBRARY == "openblas" and not kernel_blas_single()


def products_description() -> str:
    """Where `kernels.matmul` runs float32 products, in words (for reports)."""
    if LIBRARY == "mkl":
        return "mkl on the OpenMP threads"
    if products_on_numpy_threads():
        return "openblas on NumPy's threads"
    version = _KERNEL_BLAS.version  # pinned here (kernel_blas_single); None if unreadable
    return f"openblas{f' {version}' if version else ''}, one block per Numba thread"


def limit_numpy_blas(threads: int):
    """A threadpoolctl limit of `threads` on every BLAS library but the kernels' pinned one (which
    stays at one thread: raising it would take the products back to NumPy's threads), to use as
    a context manager; None without threadpoolctl."""
    if controller() is None:
        return None
    blas = controller().select(user_api="blas").lib_controllers
    paths = [lib.filepath for lib in blas if lib is not _KERNEL_BLAS]
    return controller().select(filepath=paths).limit(limits=threads)


# Only when products run on NumPy's threads must Numba's idle threads sleep at once.
backend.openmp_wait_policy(products_on_numpy_threads())


@intrinsic
def _sgemm(typingctx, trans_a, trans_b, m, n, k, alpha, a, b, beta, c, lda, ldb, ldc):
    """Fortran sgemm (column-major): c <- alpha op(a) op(b) + beta c, every argument by address."""
    sig = types.void(
        trans_a, trans_b, m, n, k, types.float32, a, b, types.float32, c, lda, ldb, ldc
    )

    def codegen(context, builder, signature, args):
        ta, tb, m_, n_, k_, alpha_, a_, b_, beta_, c_, lda_, ldb_, ldc_ = args
        i8, i32 = ir.IntType(8), ir.IntType(32)

        def scalar(value, ty):  # a stack slot holding value, as the pointer sgemm reads
            return cgutils.alloca_once_value(
                builder,
                value
                if value.type == ty
                else (builder.trunc(value, ty) if isinstance(ty, ir.IntType) else value),
            )

        def data(array, array_type):
            return context.make_array(array_type)(context, builder, array).data

        sig_args = signature.args
        pointers = [
            scalar(ta, i8), scalar(tb, i8), scalar(m_, i32), scalar(n_, i32), scalar(k_, i32),
            scalar(alpha_, ir.FloatType()), data(a_, sig_args[6]), scalar(lda_, i32),
            data(b_, sig_args[7]), scalar(ldb_, i32), scalar(beta_, ir.FloatType()),
            data(c_, sig_args[9]), scalar(ldc_, i32),
        ]  # fmt: skip
        pointers = [builder.bitcast(p, i8.as_pointer()) for p in pointers]
        fnty = ir.FunctionType(ir.VoidType(), [i8.as_pointer()] * 13)
        fn = cgutils.get_or_insert_function(builder.module, fnty, _SYMBOL)
        builder.call(fn, pointers)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", cache=True)
def rows(a) -> int:
    """The leading dimension (row stride in elements) of a row-major float32 block."""
    return a.strides[0] // 4


@numba.njit(inline="always", cache=True)
def gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c):
    """c <- alpha op(a) op(b) + beta c on row-major blocks (unit stride within a row).

    op(x) is x for `N` and x.T for `T`; op(a) is (m, k), op(b) is (k, n), c is (m, n). Row-major
    c = op(a) op(b) is column-major c.T = op(b).T op(a).T, so sgemm gets b before a.
    """
    _sgemm(trans_b, trans_a, n, m, k, alpha, b, a, beta, c, rows(b), rows(a), rows(c))
