"""Matrix products of the Dense, MatMul and Conv ops: `matmul(a, b, out=None, accumulate=False)`.

`c = a @ b`, or `c += a @ b` into `out`, for 2-D operands. Bodies: `matmul_ref` is NumPy's `@`
(the spec, and what CuPy arrays and other dtypes run); the CPU body is one call of the sgemm
`_blas` binds (Intel MKL where installed on an Intel CPU), given the operands' own strides, so a
transposed view (`kernel.T`, `x_rows.T`) or a block of rows costs no copy and `accumulate=True`
adds the product in place (sgemm's beta = 1). With OpenBLAS bound, products take NumPy's `@`
unless `body="cpu"` asks for the sgemm body: NumPy's own OpenBLAS is the newer build of the two
in the process, and the kernels' (SciPy's) runs one thread where it is a library of its own
(`_blas._pin_kernel_openblas`).
"""

from __future__ import annotations

import numba
import numpy as np

from minivit import backend
from minivit.kernels import _blas, _dispatch

_ONE, _ZERO = np.float32(1.0), np.float32(0.0)


def matmul_ref(a, b, out=None, accumulate: bool = False):
    """The spec: `a @ b`, into `out` or added to it. Shapes: a (M, K), b (K, N) -> (M, N)"""
    if not accumulate:
        return a @ b if out is None else backend.xp_of(a).matmul(a, b, out=out)
    out += a @ b
    return out


@numba.njit(cache=True)
def _sgemm_cpu(trans_a, trans_b, a, b, beta, c):
    m, n = c.shape
    k = a.shape[0] if trans_a == _blas.T else a.shape[1]
    _blas.gemm(trans_a, trans_b, m, n, k, _ONE, a, b, beta, c)


def _block(x) -> tuple:
    """`x` as a row-major block sgemm reads without a copy, and whether it is transposed.

    Returns (block, N) when the rows of x have unit stride, (x.T, T) when its columns do, and a
    C-contiguous copy otherwise (negative or other strides).
    """
    rows, cols = x.shape
    s0, s1 = x.strides
    if (s1 == 4 or cols == 1) and s0 % 4 == 0 and s0 >= 4 * max(cols, 1):
        return x, _blas.N
    if (s0 == 4 or rows == 1) and s1 % 4 == 0 and s1 >= 4 * max(rows, 1):
        return x.T, _blas.T
    return np.ascontiguousarray(x), _blas.N


def _cpu_ready(*arrays) -> bool:
    """True when the sgemm body can run: float32 NumPy operands, no empty axis (`matmul` has
    checked that the operands are 2-D)."""
    return all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in arrays) and all(
        x.size > 0 for x in arrays[:2]
    )


def matmul(a, b, out=None, accumulate: bool = False, body: str | None = None):
    """`a @ b`, written into `out` when given, or added to it with `accumulate=True`.

    Shapes: a (M, K), b (K, N), out (M, N) -> (M, N)
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: cannot multiply shapes {a.shape} and {b.shape} as matrices")
    if accumulate and out is None:
        raise ValueError("matmul: accumulate=True needs out, the array to add the product to")
    if out is not None and out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"matmul: out has shape {out.shape}, the product {a.shape[0], b.shape[1]}")
    chosen = _dispatch.pick_body("matmul", a, body)
    arrays = (a, b) if out is None else (a, b, out)
    wanted = body == "cpu" or _blas.LIBRARY == "mkl"  # by default, only where MKL is bound
    ready = _cpu_ready(*arrays) and (out is None or out.flags.c_contiguous)
    if chosen == "cpu" and wanted and ready:
        _dispatch.cpu_ready()
        c = np.empty((a.shape[0], b.shape[1]), np.float32) if out is None else out
        (ab, ta), (bb, tb) = _block(a), _block(b)
        _sgemm_cpu(ta, tb, ab, bb, _ONE if accumulate else _ZERO, c)
        return c
    return matmul_ref(a, b, out, accumulate)
