"""LayerNorm over the last axis, in flax's convention (Ba et al. 2016, flax `nn.LayerNorm`).

`y = (x - mean) * rsqrt(var + eps) * scale + bias` with the "fast" biased variance
`var = max(mean(x^2) - mean(x)^2, 0)` (flax `use_fast_variance=True`) and eps 1e-6. The forward
returns `mean` and `rstd = rsqrt(var + eps)` so the backward does not recompute them. All
bodies accumulate the row statistics in float64, which keeps the fast-variance subtraction exact
enough for rows whose mean is large next to their spread.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import cuda  # the simulator swaps this global for NUMBA_ENABLE_CUDASIM=1

from minivit import backend
from minivit.kernels import _dispatch

GPU_THREADS = 128  # threads per row block of the GPU bodies (a power of two; tests shrink it)
GPU_COLUMN_THREADS = 128  # threads per block of the GPU column-sum kernel


def layernorm_forward_ref(x, scale, bias, eps: float = 1e-6):
    """The spec, plain NumPy with float64 statistics.

    Shapes: x (R, D), scale (D,), bias (D,) -> y (R, D), mean (R,), rstd (R,)
    """
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=-1)  # (R,)
    var = np.maximum((x64 * x64).mean(axis=-1) - mean * mean, 0.0)  # (R,)
    rstd = 1.0 / np.sqrt(var + eps)
    y = (x64 - mean[:, None]) * rstd[:, None] * scale + bias  # (R, D)
    return y.astype(np.float32), mean.astype(np.float32), rstd.astype(np.float32)


def layernorm_backward_ref(gy, x, mean, rstd, scale):
    """The spec of the backward, plain NumPy in float64.

    Shapes: gy (R, D), x (R, D), mean (R,), rstd (R,), scale (D,) -> gx (R, D), gscale (D,),
    gbias (D,)
    """
    gy64 = np.asarray(gy, dtype=np.float64)
    rstd64 = np.asarray(rstd, dtype=np.float64)[:, None]  # (R, 1)
    xhat = (np.asarray(x, dtype=np.float64) - mean[:, None]) * rstd64  # (R, D)
    g = gy64 * scale  # (R, D): gradient with respect to xhat
    gx = rstd64 * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    gscale = (gy64 * xhat).sum(axis=0)  # (D,)
    gbias = gy64.sum(axis=0)  # (D,)
    return gx.astype(np.float32), gscale.astype(np.float32), gbias.astype(np.float32)


@_dispatch.cpu_kernel(fastmath=True)
def _forward_cpu(x, scale, bias, eps, y, mean, rstd):
    for r in numba.prange(x.shape[0]):  # one row per task
        s1 = 0.0
        s2 = 0.0
        for j in range(x.shape[1]):
            v = np.float64(x[r, j])
            s1 += v
            s2 += v * v
        m = s1 / x.shape[1]
        inv = 1.0 / np.sqrt(max(s2 / x.shape[1] - m * m, 0.0) + eps)
        mean[r] = m
        rstd[r] = inv
        m32 = np.float32(m)
        inv32 = np.float32(inv)
        for j in range(x.shape[1]):
            y[r, j] = (x[r, j] - m32) * inv32 * scale[j] + bias[j]


@_dispatch.cpu_kernel(fastmath=True)
def _backward_cpu(gy, x, mean, rstd, scale, chunk, gx, gscale_parts, gbias_parts):
    rows, d = x.shape
    for c in numba.prange(gscale_parts.shape[0]):  # a chunk of rows per task
        for r in range(c * chunk, min((c + 1) * chunk, rows)):
            s_g = 0.0
            s_gx = 0.0
            for j in range(d):
                xhat = (x[r, j] - mean[r]) * rstd[r]
                g = gy[r, j] * scale[j]
                s_g += g
                s_gx += g * xhat
                gscale_parts[c, j] += gy[r, j] * xhat
                gbias_parts[c, j] += gy[r, j]
            a = np.float32(s_g / d)
            b = np.float32(s_gx / d)
            for j in range(d):
                xhat = (x[r, j] - mean[r]) * rstd[r]
                gx[r, j] = rstd[r] * (gy[r, j] * scale[j] - a - xhat * b)


def _forward_cpu_body(x, scale, bias, eps):
    _dispatch.cpu_ready()
    y = np.empty_like(x)
    mean = np.empty(x.shape[0], np.float32)
    rstd = np.empty(x.shape[0], np.float32)
    _forward_cpu.body(x.size)(x, scale, bias, eps, y, mean, rstd)
    return y, mean, rstd


def _backward_cpu_body(gy, x, mean, rstd, scale):
    _dispatch.cpu_ready()
    chunks = min(x.shape[0], 4 * numba.get_num_threads())
    chunk = -(-x.shape[0] // chunks)
    gx = np.empty_like(x)
    gscale = np.zeros((chunks, x.shape[1]), np.float64)  # per-chunk partial column sums
    gbias = np.zeros((chunks, x.shape[1]), np.float64)
    _backward_cpu.body(x.size)(gy, x, mean, rstd, scale, chunk, gx, gscale, gbias)
    return gx, gscale.sum(0).astype(np.float32), gbias.sum(0).astype(np.float32)


@functools.cache
def _gpu_kernels(threads: int):
    """Compile the GPU kernels once per block size, on first use."""
    from numba import float64  # noqa: PLC0415

    @cuda.jit(device=True)
    def block_sum2(buf_a, buf_b, a, b):
        """Sum a and b over the block (tree in shared memory); every thread gets the sums."""
        t = cuda.threadIdx.x
        buf_a[t] = a
        buf_b[t] = b
        cuda.syncthreads()
        step = threads // 2
        while step > 0:
            if t < step:
                buf_a[t] += buf_a[t + step]
                buf_b[t] += buf_b[t + step]
            cuda.syncthreads()
            step //= 2
        a, b = buf_a[0], buf_b[0]
        cuda.syncthreads()
        return a, b

    @cuda.jit
    def forward(x, scale, bias, eps, y, mean, rstd):
        r = cuda.blockIdx.x  # one row per block
        buf_a = cuda.shared.array(threads, float64)
        buf_b = cuda.shared.array(threads, float64)
        d = x.shape[1]
        s1 = 0.0
        s2 = 0.0
        for j in range(cuda.threadIdx.x, d, threads):
            v = float64(x[r, j])
            s1 += v
            s2 += v * v
        s1, s2 = block_sum2(buf_a, buf_b, s1, s2)
        m = s1 / d
        var = s2 / d - m * m  # (no builtin max/min in CUDA code: numba's overload fails there)
        inv = 1.0 / math.sqrt((var if var > 0.0 else 0.0) + eps)
        if cuda.threadIdx.x == 0:
            mean[r] = m
            rstd[r] = inv
        for j in range(cuda.threadIdx.x, d, threads):
            y[r, j] = (x[r, j] - m) * inv * scale[j] + bias[j]

    @cuda.jit
    def backward_rows(gy, x, mean, rstd, scale, gx):
        r = cuda.blockIdx.x  # one row per block
        buf_a = cuda.shared.array(threads, float64)
        buf_b = cuda.shared.array(threads, float64)
        d = x.shape[1]
        s_g = 0.0
        s_gx = 0.0
        for j in range(cuda.threadIdx.x, d, threads):
            g = gy[r, j] * scale[j]
            s_g += g
            s_gx += g * (x[r, j] - mean[r]) * rstd[r]
        s_g, s_gx = block_sum2(buf_a, buf_b, s_g, s_gx)
        for j in range(cuda.threadIdx.x, d, threads):
            xhat = (x[r, j] - mean[r]) * rstd[r]
            gx[r, j] = rstd[r] * (gy[r, j] * scale[j] - s_g / d - xhat * s_gx / d)

    @cuda.jit
    def backward_columns(gy, x, mean, rstd, gscale, gbias):
        j = cuda.grid(1)  # one column per thread; neighbouring threads read neighbouring columns
        if j < x.shape[1]:
            s_scale = 0.0
            s_bias = 0.0
            for r in range(x.shape[0]):
                s_scale += gy[r, j] * (x[r, j] - mean[r]) * rstd[r]
                s_bias += gy[r, j]
            gscale[j] = s_scale
            gbias[j] = s_bias

    return forward, backward_rows, backward_columns


def _forward_gpu_body(x, scale, bias, eps):
    xp = backend.xp_of(x)
    forward, _, _ = _gpu_kernels(GPU_THREADS)
    y = xp.empty_like(x)
    mean = xp.empty(x.shape[0], np.float32)
    rstd = xp.empty(x.shape[0], np.float32)
    forward[x.shape[0], GPU_THREADS](x, scale, bias, eps, y, mean, rstd)
    return y, mean, rstd


def _backward_gpu_body(gy, x, mean, rstd, scale):
    xp = backend.xp_of(x)
    _, rows, columns = _gpu_kernels(GPU_THREADS)
    gx = xp.empty_like(x)
    gscale = xp.empty(x.shape[1], np.float32)
    gbias = xp.empty(x.shape[1], np.float32)
    rows[x.shape[0], GPU_THREADS](gy, x, mean, rstd, scale, gx)
    columns[_dispatch.blocks(x.shape[1], GPU_COLUMN_THREADS), GPU_COLUMN_THREADS](
        gy, x, mean, rstd, gscale, gbias
    )
    return gx, gscale, gbias


def layernorm_forward(x, scale, bias, eps: float = 1e-6, body: str | None = None):
    """Fused LayerNorm forward; returns what the backward needs.

    Shapes: x (R, D), scale (D,), bias (D,) -> y (R, D), mean (R,), rstd (R,)
    """
    _dispatch.check_2d("layernorm_forward", "x", x)
    chosen = _dispatch.pick_body("layernorm_forward", x, body)
    if chosen == "ref":
        return layernorm_forward_ref(x, scale, bias, eps)
    args = _dispatch.float32_rows(backend.xp_of(x), x, scale, bias)
    run = _forward_cpu_body if chosen == "cpu" else _forward_gpu_body
    return run(*args, float(eps))


def layernorm_backward(gy, x, mean, rstd, scale, body: str | None = None):
    """Fused LayerNorm backward from the saved statistics.

    Shapes: gy (R, D), x (R, D), mean (R,), rstd (R,), scale (D,) -> gx (R, D), gscale (D,),
    gbias (D,)
    """
    _dispatch.check_2d("layernorm_backward", "x", x)
    chosen = _dispatch.pick_body("layernorm_backward", x, body)
    if chosen == "ref":
        return layernorm_backward_ref(gy, x, mean, rstd, scale)
    args = _dispatch.float32_rows(backend.xp_of(x), gy, x, mean, rstd, scale)
    run = _backward_cpu_body if chosen == "cpu" else _backward_gpu_body
    return run(*args)
