"""StdConv weight standardisation (BiT, Kolesnikov et al. 2020): `(w - mean) / (std + eps)` per
output channel, with `std` the biased standard deviation, and its backward.

Every forward of a BiT ResNet standardises every conv kernel again, so at batch 1 the array
code's five single-threaded passes (mean, subtract, square, mean, divide) over the kernels were
a fifth of an R26+S/32 inference step (31 of 151 ms on 2 cores). The Numba bodies make two
passes over each block of output channels (the sums, then the write; the backward too), with the
statistics in float64 (sums of `w - w[0]`, which keeps `E[d^2] - E[d]^2` free of cancellation),
a block of channels per task, and small kernels on the calling thread (`_dispatch.CpuKernel`).
The forward returns the per-channel `mean` and `std`, so the backward needs only the kernel
itself, not a centred copy of it. CuPy arrays run the array code.

Shapes: w (P, O) with P = kh * kw * I the reduced axes of a (kh, kw, I, O) kernel.
"""

from __future__ import annotations

import numba
import numpy as np

from minivit import backend
from minivit.kernels import _dispatch

# Output channels per task of the CPU bodies. The passes are bound by memory, not arithmetic: wider
# blocks read longer stretches of each row, and over R26+S/32's 30 kernels (14.7M weights) the
# forward took 17.5, 15.7, 13.7, 10.1 and 14.8 ms at 64 (two tasks per thread), 128, 256, 512 and
# 2048 channels per task (NumPy's array code: 25 ms; 2 cores).
COLUMNS = 512


def standardize_forward_ref(w, eps: float = 1e-5):
    """The spec, in float64 (NumPy or CuPy). Shapes: w (P, O) -> y (P, O), mean (O,), std (O,)"""
    w64 = w.astype(np.float64)
    mean = w64.mean(axis=0)
    centred = w64 - mean
    std = np.sqrt((centred * centred).mean(axis=0))
    y = centred / (std + eps)
    return y.astype(np.float32), mean.astype(np.float32), std.astype(np.float32)


def standardize_backward_ref(gy, w, mean, std, eps: float = 1e-5):
    """The spec of the backward, in float64 (NumPy or CuPy); a constant channel (std 0) passes
    gy / eps less its mean. Shapes: gy (P, O), w (P, O), mean (O,), std (O,) -> gw (P, O)"""
    xp, p = backend.xp_of(w), w.shape[0]
    gy64, centred = gy.astype(np.float64), w.astype(np.float64) - mean.astype(np.float64)
    std64 = std.astype(np.float64)
    denom = std64 + eps
    inv_std = xp.where(std64 > 0, 1.0 / xp.where(std64 > 0, std64, 1.0), 0.0)
    along = (gy64 * centred).sum(axis=0) * inv_std / (p * denom * denom)  # (O,)
    gc = gy64 / denom - centred * along  # d/d(centred)
    return (gc - gc.mean(axis=0)).astype(np.float32)


# The column loops run over one row's slice of the block (`w[r, lo:hi]`): indexed from 0 that way,
# LLVM vectorises them (a (2304, 256) column sum 870 -> 120 us, about NumPy's `sum(0)`).
@_dispatch.cpu_kernel(fastmath=True)
def _forward_cpu(w, eps, columns, y, mean, std):
    p, o = w.shape
    for block in numba.prange((o + columns - 1) // columns):
        lo = block * columns
        hi = min(o, lo + columns)
        n = hi - lo
        shift = w[0, lo:hi].astype(np.float64)  # sums of w - w[0] keep the variance exact
        s = np.zeros(n)
        ss = np.zeros(n)
        for r in range(p):
            row = w[r, lo:hi]
            for j in range(n):
                d = row[j] - shift[j]
                s[j] += d
                ss[j] += d * d
        m = shift + s / p
        sd = np.sqrt(np.maximum(ss / p - (s / p) ** 2, 0.0))
        mean[lo:hi] = m
        std[lo:hi] = sd
        m32 = m.astype(np.float32)
        inv32 = (1.0 / (sd + eps)).astype(np.float32)
        for r in range(p):
            row = w[r, lo:hi]
            out = y[r, lo:hi]
            for j in range(n):
                out[j] = (row[j] - m32[j]) * inv32[j]


@_dispatch.cpu_kernel(fastmath=True)
def _backward_cpu(gy, w, mean, std, eps, columns, gw):
    p, o = w.shape
    for block in numba.prange((o + columns - 1) // columns):
        lo = block * columns
        hi = min(o, lo + columns)
        n = hi - lo
        m = mean[lo:hi].astype(np.float64)
        s_gc = np.zeros(n)  # sums of gy * centred, gy and centred
        s_g = np.zeros(n)
        s_c = np.zeros(n)
        for r in range(p):
            row = w[r, lo:hi]
            grow = gy[r, lo:hi]
            for j in range(n):
                c = np.float64(row[j]) - m[j]
                g = np.float64(grow[j])
                s_gc[j] += g * c
                s_g[j] += g
                s_c[j] += c
        sd = std[lo:hi].astype(np.float64)
        denom = sd + eps
        inv_std = np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0)
        along = s_gc * inv_std / (p * denom * denom)
        shift32 = ((s_g / denom - along * s_c) / p).astype(np.float32)  # the mean of gc
        m32 = mean[lo:hi]
        inv_denom32 = (1.0 / denom).astype(np.float32)
        along32 = along.astype(np.float32)
        for r in range(p):
            row = w[r, lo:hi]
            grow = gy[r, lo:hi]
            out = gw[r, lo:hi]
            for j in range(n):
                out[j] = grow[j] * inv_denom32[j] - (row[j] - m32[j]) * along32[j] - shift32[j]


def standardize_forward(w, eps: float = 1e-5, body: str | None = None):
    """Standardise each column of `w` (an output channel); returns what the backward needs.

    Shapes: w (P, O) -> y (P, O), mean (O,), std (O,)
    """
    _dispatch.check_2d("standardize_forward", "w", w)
    if _dispatch.pick_body("standardize_forward", w, body) != "cpu":
        return standardize_forward_ref(w, eps)
    _dispatch.cpu_ready()
    (w,) = _dispatch.float32_rows(np, w)
    y = np.empty_like(w)
    mean = np.empty(w.shape[1], np.float32)
    std = np.empty(w.shape[1], np.float32)
    _forward_cpu.body(w.size)(w, float(eps), COLUMNS, y, mean, std)
    return y, mean, std


def standardize_backward(gy, w, mean, std, eps: float = 1e-5, body: str | None = None):
    """The kernel gradient from the forward's statistics. Shapes: gy, w (P, O), mean, std (O,)
    -> gw (P, O)"""
    _dispatch.check_2d("standardize_backward", "w", w)
    if _dispatch.pick_body("standardize_backward", w, body) != "cpu":
        return standardize_backward_ref(gy, w, mean, std, eps)
    _dispatch.cpu_ready()
    gy, w, mean, std = _dispatch.float32_rows(np, gy, w, mean, std)
    gw = np.empty_like(w)
    _backward_cpu.body(w.size)(gy, w, mean, std, float(eps), COLUMNS, gw)
    return gw
