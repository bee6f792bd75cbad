"""The bias gradient of a Dense or Conv layer, `bias_grad(g)`: the column sum of the output
gradient (the bias add itself rides in the product, `kernels.matmul(..., bias=)`).

NumPy's `g.sum(axis=0)` runs on one core; the Numba body gives each thread a contiguous run of
rows and sums them `BLOCK_ROWS` at a time in float32 (vectorised across the columns), adding each
block's sums into float64 totals, so the rounding is that of a 128-row float32 sum, not of
thousands (a threaded all-float64 sum was slower than NumPy's: 1.25 vs 1.0 ms on a (6304, 1536)
gradient).
"""

from __future__ import annotations

import numba
import numpy as np

from minivit.kernels import _dispatch

BLOCK_ROWS = 128  # rows summed in float32 before their sums join the float64 totals


def bias_grad_ref(g):
    """The spec: column sums in float64, in g's dtype. Shapes: g (R, O) -> (O,)"""
    return g.sum(axis=0, dtype=np.float64).astype(g.dtype)


@_dispatch.cpu_kernel(fastmath=True)
def _bias_grad_cpu(g, parts, totals):
    rows, cols = g.shape
    for p in numba.prange(parts):  # one contiguous run of rows per part
        block = np.empty(cols, np.float32)
        for b0 in range(p * rows // parts, (p + 1) * rows // parts, BLOCK_ROWS):
            b1 = min(b0 + BLOCK_ROWS, (p + 1) * rows // parts)
            block[:] = 0.0
            for r in range(b0, b1):
                for c in range(cols):
                    block[c] += g[r, c]
            for c in range(cols):
                totals[p, c] += block[c]


def bias_grad(g, body: str | None = None):
    """The bias gradient of a Dense or Conv output: the sum of g over its rows.

    Shapes: g (R, O) -> (O,), in g's dtype (the CPU body for float32, the spec otherwise)
    """
    if _dispatch.pick_body("bias_grad", g, body) != "cpu" or g.dtype != np.float32:
        return bias_grad_ref(g)
    _dispatch.check_2d("bias_grad", "g", g)
    _dispatch.cpu_ready()
    kernel = _bias_grad_cpu.body(g.size)
    parts = 1 if kernel is _bias_grad_cpu.serial else numba.get_num_threads()
    totals = np.zeros((parts, g.shape[1]), np.float64)
    kernel(g if g.strides[-1] == 4 else np.ascontiguousarray(g), parts, totals)
    return totals.sum(axis=0).astype(np.float32)
