"""Matrix products of the Dense, MatMul and Conv ops: `matmul(a, b, out=None, accumulate=False)`.

`c = a @ b`, or `c += a @ b` into `out`, for 2-D operands. Bodies: `matmul_ref` is NumPy's `@`
(the spec, and what CuPy arrays and other dtypes run); the CPU body calls the sgemm `_blas` binds,
given the operands' own strides, so a transposed view (`kernel.T`, `x_rows.T`) or a block of rows
costs no copy and `accumulate=True` adds the product in place (sgemm's beta = 1):

- MKL (installed, on an Intel CPU): one call; MKL threads it on the OpenMP pool Numba's kernels
  use.
- OpenBLAS of its own (the `scipy-openblas32` wheel's or SciPy's, pinned to one thread,
  `_blas.kernel_blas_single`): the product is cut into one block of rows or of columns per
  Numba thread and each thread makes one single-threaded call (`_sgemm_split`), so products and
  kernels run on one pool of threads, which spin briefly between regions instead of sleeping
  (see `backend`). NumPy's threaded OpenBLAS runs the same products at the same rate one at a
  time, but in a step each call waits for its sleeping worker: on 2 AMD EPYC cores a ViT-Ti/16
  batch-1 forward took 25-31 instead of 32-37 ms (3 alternating pairs of processes). Products
  under `SPLIT_ABOVE` multiply-adds run on the calling thread.
- OpenBLAS shared with NumPy (some system builds): NumPy's `@`, which threads it, unless
  `body="cpu"` asks for the single sgemm call.
"""

from __future__ import annotations

import numba
import numpy as np

from minivit import backend
from minivit.kernels import _blas, _dispatch

_ONE, _ZERO = np.float32(1.0), np.float32(0.0)
_NO_BIAS = np.empty(0, np.float32)  # the bodies' "no bias" (one array type for Numba's cache)
# Products of fewer multiply-adds run on the calling thread: a region costs a few microseconds,
# about what 2^19 multiply-adds take on one core (a classifier head at batch 1 is 384 x 1000).
SPLIT_ABOVE = 1 << 19
_ALIGN = 16  # column blocks start on a 64-byte boundary of each row


def matmul_ref(a, b, out=None, accumulate: bool = False, bias=None):
    """The spec: `a @ b` (plus `bias` on every row), into `out` or added to it.

    Shapes: a (M, K), b (K, N), bias (N,) -> (M, N)
    """
    if accumulate:
        out += a @ b
    else:
        out = a @ b if out is None else backend.xp_of(a).matmul(a, b, out=out)
    if bias is not None:
        out += bias
    return out


@numba.njit(inline="always", cache=True)
def _start_from_bias(c, bias, beta):
    """Fill the block c with the bias rows and return sgemm's beta for adding the product to
    them (1); without a bias (size 0), c is left alone and `beta` returned."""
    if bias.size == 0:
        return beta
    for r in range(c.shape[0]):
        for j in range(c.shape[1]):
            c[r, j] = bias[j]
    return _ONE


@numba.njit(cache=True)
def _sgemm_cpu(trans_a, trans_b, a, b, beta, c, bias):
    m, n = c.shape
    k = a.shape[0] if trans_a == _blas.T else a.shape[1]
    beta = _start_from_bias(c, bias, beta)
    _blas.gemm(trans_a, trans_b, m, n, k, _ONE, a, b, beta, c)


@numba.njit(parallel=True, cache=True)
def _sgemm_split(trans_a, trans_b, a, b, beta, c, parts, by_rows, bias):
    """c <- op(a) op(b) + beta c (or + the bias rows, when `bias` is not empty) as `parts`
    single-threaded sgemm calls, one per Numba thread: on blocks of rows of c (`by_rows`) or of
    columns (starting at multiples of `_ALIGN`), each thread writing its own block's bias."""
    m, n = c.shape
    k = a.shape[0] if trans_a == _blas.T else a.shape[1]
    for p in numba.prange(parts):
        if by_rows:
            i0, i1 = p * m // parts, (p + 1) * m // parts
            if i1 > i0:
                ab = a[i0:i1] if trans_a == _blas.N else a[:, i0:i1]
                block_beta = _start_from_bias(c[i0:i1], bias, beta)
                _blas.gemm(trans_a, trans_b, i1 - i0, n, k, _ONE, ab, b, block_beta, c[i0:i1])
        else:
            j0 = p * n // parts // _ALIGN * _ALIGN
            j1 = n if p == parts - 1 else (p + 1) * n // parts // _ALIGN * _ALIGN
            if j1 > j0:
                bb = b[:, j0:j1] if trans_b == _blas.N else b[j0:j1]
                block_beta = _start_from_bias(c[:, j0:j1], bias[j0:j1], beta)  # empty: none
                _blas.gemm(trans_a, trans_b, m, j1 - j0, k, _ONE, a, bb, block_beta, c[:, j0:j1])


def split_plan(m: int, n: int, k: int, threads: int) -> tuple[int, bool]:
    """How `matmul` cuts an (m, k) x (k, n) product over Numba's threads with OpenBLAS of its own:
    (blocks, by_rows). One block (on the calling thread) below `SPLIT_ABOVE` multiply-adds;
    otherwise one per thread along the longer side of the result, no more than that side has
    rows, or `_ALIGN`-wide columns."""
    if threads < 2 or m * n * k < SPLIT_ABOVE:
        return 1, True
    by_rows = m >= n
    return max(1, min(threads, m if by_rows else n // _ALIGN)), by_rows


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
    for x in arrays:  # loops, not generators: this runs for every product of a step
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            return False
    return arrays[0].size > 0 and arrays[1].size > 0


def matmul(a, b, out=None, accumulate: bool = False, body: str | None = None, bias=None):
    """`a @ b`, written into `out` when given, or added to it with `accumulate=True`; with
    `bias`, the bias is added to every row of the product (the Dense and Conv bias add): the
    sgemm body starts each thread's block of the result from the bias rows and adds the
    product to them (beta = 1), in place of OpenBLAS zeroing the block (beta = 0) and a second
    pass over the result adding the bias.

    Shapes: a (M, K), b (K, N), bias (N,), out (M, N) -> (M, N)
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: cannot multiply shapes {a.shape} and {b.shape} as matrices")
    if accumulate and out is None:
        raise ValueError("matmul: accumulate=True needs out, the array to add the product to")
    if out is not None and out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"matmul: out has shape {out.shape}, the product {a.shape[0], b.shape[1]}")
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(
            f"matmul: bias has shape {bias.shape}; it must be ({b.shape[1]},), one value per "
            "column of the product"
        )
    chosen = _dispatch.pick_body("matmul", a, body)
    arrays = (a, b) if out is None else (a, b, out)
    on_numpy = _blas.products_on_numpy_threads()
    split = _blas.LIBRARY == "openblas" and not on_numpy
    wanted = body == "cpu" or not on_numpy
    ready = _cpu_ready(*arrays) and (out is None or out.flags.c_contiguous)
    if bias is not None:  # the bias goes into the block as it is; accumulate adds it after
        on_host = isinstance(bias, np.ndarray) and bias.dtype == np.float32
        ready = ready and not accumulate and on_host and bias.flags.c_contiguous
    if chosen == "cpu" and wanted and ready:
        _dispatch.cpu_ready()
        c = np.empty((a.shape[0], b.shape[1]), np.float32) if out is None else out
        (ab, ta), (bb, tb) = _block(a), _block(b)
        beta = _ONE if accumulate else _ZERO
        rows = _NO_BIAS if bias is None else bias
        parts, by_rows = split_plan(*c.shape, a.shape[1], numba.get_num_threads() if split else 1)
        if parts > 1:
            _sgemm_split(ta, tb, ab, bb, beta, c, parts, by_rows, rows)
        else:
            _sgemm_cpu(ta, tb, ab, bb, beta, c, rows)
        return c
    return matmul_ref(a, b, out, accumulate, bias)
