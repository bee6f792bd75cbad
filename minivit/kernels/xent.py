"""Softmax cross-entropy per row, fused with its log-sum-exp (the official ViT training loss).

`loss_r = -sum_c y_rc log_softmax(z_r)_c = lse_r sum_c y_rc - sum_c y_rc z_rc`, for one-hot or soft
labels y; the forward keeps `lse_r` so the backward, `g_r (softmax(z_r) sum_c y_rc - y_r)`, needs
one pass. The caller averages over the batch (the official `-mean_b sum_c ...`).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import cuda  # the simulator swaps this global for NUMBA_ENABLE_CUDASIM=1

from minivit import backend
from minivit.kernels import _dispatch
from minivit.kernels._vecmath import exp32

GPU_THREADS = 128  # rows per block of the GPU kernels (one thread per row)


def softmax_xent_forward_ref(logits, onehot):
    """The spec, plain NumPy in float64.

    Shapes: logits (R, C), onehot (R, C) -> loss_rows (R,), lse (R,)
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(onehot, dtype=np.float64)
    top = z.max(axis=-1)  # (R,)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=-1))  # (R,)
    loss = lse * y.sum(axis=-1) - (y * z).sum(axis=-1)  # (R,)
    return loss.astype(np.float32), lse.astype(np.float32)


def softmax_xent_backward_ref(g_rows, logits, onehot, lse):
    """The spec of the backward, plain NumPy in float64.

    Shapes: g_rows (R,), logits (R, C), onehot (R, C), lse (R,) -> glogits (R, C)
    """
    y = np.asarray(onehot, dtype=np.float64)
    p = np.exp(np.asarray(logits, dtype=np.float64) - np.asarray(lse, np.float64)[:, None])
    g = np.asarray(g_rows, dtype=np.float64)[:, None]  # (R, 1)
    return (g * (p * y.sum(axis=-1, keepdims=True) - y)).astype(np.float32)


@_dispatch.cpu_kernel(fastmath=True)
def _forward_cpu(z, y, loss, lse):
    for r in numba.prange(z.shape[0]):
        top = z[r, 0]
        for c in range(z.shape[1]):
            top = max(top, z[r, c])
        total = 0.0
        y_sum = 0.0
        yz = 0.0
        for c in range(z.shape[1]):
            total += exp32(z[r, c] - top)
            y_sum += y[r, c]
            yz += np.float64(y[r, c]) * z[r, c]
        lse[r] = top + math.log(total)
        loss[r] = (top + math.log(total)) * y_sum - yz


@_dispatch.cpu_kernel(fastmath=True)
def _backward_cpu(g, z, y, lse, gz):
    for r in numba.prange(z.shape[0]):
        y_sum = np.float32(0.0)
        for c in range(z.shape[1]):
            y_sum += y[r, c]
        for c in range(z.shape[1]):
            gz[r, c] = g[r] * (exp32(z[r, c] - lse[r]) * y_sum - y[r, c])


def _forward_cpu_body(z, y):
    _dispatch.cpu_ready()
    loss = np.empty(z.shape[0], np.float32)
    lse = np.empty(z.shape[0], np.float32)
    _forward_cpu.body(z.size)(z, y, loss, lse)
    return loss, lse


def _backward_cpu_body(g, z, y, lse):
    _dispatch.cpu_ready()
    gz = np.empty_like(z)
    _backward_cpu.body(z.size)(g, z, y, lse, gz)
    return gz


@functools.cache
def _gpu_kernels():
    """Compile the GPU kernels on first use."""

    @cuda.jit
    def forward(z, y, loss, lse):
        r = cuda.grid(1)  # one row per thread: C is small next to the matrix products around it
        if r < z.shape[0]:
            top = z[r, 0]
            for c in range(z.shape[1]):
                top = z[r, c] if z[r, c] > top else top  # no builtin max in CUDA code
            total = 0.0
            y_sum = 0.0
            yz = 0.0
            for c in range(z.shape[1]):
                total += math.exp(z[r, c] - top)
                y_sum += y[r, c]
                yz += y[r, c] * z[r, c]
            lse[r] = top + math.log(total)
            loss[r] = (top + math.log(total)) * y_sum - yz

    @cuda.jit
    def backward(g, z, y, lse, gz):
        r = cuda.grid(1)
        if r < z.shape[0]:
            y_sum = 0.0
            for c in range(z.shape[1]):
                y_sum += y[r, c]
            for c in range(z.shape[1]):
                gz[r, c] = g[r] * (math.exp(z[r, c] - lse[r]) * y_sum - y[r, c])

    return forward, backward


def _forward_gpu_body(z, y):
    xp = backend.xp_of(z)
    loss = xp.empty(z.shape[0], np.float32)
    lse = xp.empty(z.shape[0], np.float32)
    _gpu_kernels()[0][_dispatch.blocks(z.shape[0], GPU_THREADS), GPU_THREADS](z, y, loss, lse)
    return loss, lse


def _backward_gpu_body(g, z, y, lse):
    gz = backend.xp_of(z).empty_like(z)
    _gpu_kernels()[1][_dispatch.blocks(z.shape[0], GPU_THREADS), GPU_THREADS](g, z, y, lse, gz)
    return gz


def _check(kernel: str, logits, onehot) -> None:
    _dispatch.check_2d(kernel, "logits", logits)
    if onehot.shape != logits.shape:
        raise ValueError(
            f"{kernel}: labels have shape {tuple(onehot.shape)} but logits {tuple(logits.shape)}; "
            "pass one-hot or soft labels of the logits' shape"
        )


def softmax_xent_forward(logits, onehot, body: str | None = None):
    """Cross-entropy per row and the log-sum-exp the backward reuses.

    Shapes: logits (R, C), onehot (R, C) -> loss_rows (R,), lse (R,)
    """
    _check("softmax_xent_forward", logits, onehot)
    chosen = _dispatch.pick_body("softmax_xent_forward", logits, body)
    if chosen == "ref":
        return softmax_xent_forward_ref(logits, onehot)
    args = _dispatch.float32_rows(backend.xp_of(logits), logits, onehot)
    return (_forward_cpu_body if chosen == "cpu" else _forward_gpu_body)(*args)


def softmax_xent_backward(g_rows, logits, onehot, lse, body: str | None = None):
    """Gradient of `sum_r g_r loss_r` with respect to the logits.

    Shapes: g_rows (R,), logits (R, C), onehot (R, C), lse (R,) -> glogits (R, C)
    """
    _check("softmax_xent_backward", logits, onehot)
    chosen = _dispatch.pick_body("softmax_xent_backward", logits, body)
    if chosen == "ref":
        return softmax_xent_backward_ref(g_rows, logits, onehot, lse)
    args = _dispatch.float32_rows(backend.xp_of(logits), g_rows, logits, onehot, lse)
    return (_backward_cpu_body if chosen == "cpu" else _backward_gpu_body)(*args)
