"""Fused GroupNorm (flax `nn.GroupNorm`, the BiT ResNet norm) over channels-last activations.

Flax defaults: contiguous groups (channel c in group c // (C / G)), statistics per sample and group
over (H*W, C/G) with the fast variance `mean(x^2) - mean(x)^2` clipped at 0, epsilon 1e-6,
`y = (x - mean) * rsqrt(var + eps) * scale + bias`. The forward returns the per-(sample, group)
mean and reciprocal std that the backward reuses.

Two bodies: the NumPy reference (the spec; it is also what CuPy arrays run, as array code) and a
Numba CPU body with one thread per (sample, group) that walks its slice twice forward and twice
backward instead of the many full-array passes of the array code.
"""

from __future__ import annotations

import numba
import numpy as np

from minivit import backend
from minivit.kernels import _dispatch


def groupnorm_forward_ref(x, scale, bias, num_groups: int, eps: float = 1e-6):
    """The spec, in the array module of x (float64 statistics on NumPy).

    Shapes: x (B, S, C) with S = H*W, scale (C,), bias (C,) -> y (B, S, C), mean (B, G), rstd (B, G)
    """
    xp = backend.xp_of(x)
    b, s, c = x.shape
    xg = x.reshape(b, s, num_groups, c // num_groups).astype(xp.float64)  # (B, S, G, C/G)
    mean = xg.mean(axis=(1, 3))  # (B, G)
    var = xp.maximum((xg * xg).mean(axis=(1, 3)) - mean * mean, 0.0)
    rstd = 1.0 / xp.sqrt(var + eps)  # (B, G)
    xhat = (xg - mean[:, None, :, None]) * rstd[:, None, :, None]  # (B, S, G, C/G)
    y = xhat.reshape(b, s, c) * scale + bias
    return y.astype(x.dtype), mean.astype(x.dtype), rstd.astype(x.dtype)


def groupnorm_backward_ref(gy, x, mean, rstd, scale, num_groups: int):
    """The spec of the backward. Shapes: gy, x (B, S, C), mean, rstd (B, G), scale (C,) ->
    gx (B, S, C), gscale (C,), gbias (C,)"""
    xp = backend.xp_of(x)
    b, s, c = x.shape
    groups = (b, s, num_groups, c // num_groups)
    m, r = mean[:, None, :, None], rstd[:, None, :, None]  # (B, 1, G, 1)
    xhat = (x.reshape(groups).astype(xp.float64) - m) * r  # (B, S, G, C/G)
    g = gy.reshape(groups).astype(xp.float64)
    gxhat = g * scale.reshape(1, 1, num_groups, -1)
    gx = r * (
        gxhat
        - gxhat.mean(axis=(1, 3), keepdims=True)
        - xhat * (gxhat * xhat).mean(axis=(1, 3), keepdims=True)
    )
    gscale = (g * xhat).sum(axis=(0, 1)).reshape(c)
    gbias = g.sum(axis=(0, 1)).reshape(c)
    return (gx.reshape(x.shape).astype(x.dtype), gscale.astype(x.dtype), gbias.astype(x.dtype))


@numba.njit(parallel=True, cache=True)
def _forward_cpu(x, scale, bias, num_groups, eps, y, mean, rstd):
    b, s, c = x.shape
    cg = c // num_groups
    for task in numba.prange(b * num_groups):
        n, g = task // num_groups, task % num_groups
        lo = g * cg
        total = 0.0
        total2 = 0.0
        for i in range(s):
            for j in range(lo, lo + cg):
                v = np.float64(x[n, i, j])
                total += v
                total2 += v * v
        mu = total / (s * cg)
        r = 1.0 / np.sqrt(max(total2 / (s * cg) - mu * mu, 0.0) + eps)
        mean[n, g] = mu
        rstd[n, g] = r
        for i in range(s):
            for j in range(lo, lo + cg):
                y[n, i, j] = (x[n, i, j] - mu) * r * scale[j] + bias[j]


@numba.njit(parallel=True, cache=True)
def _backward_cpu(gy, x, mean, rstd, scale, num_groups, gx, gscale_parts, gbias_parts):
    b, s, c = x.shape
    cg = c // num_groups
    for task in numba.prange(b * num_groups):
        n, g = task // num_groups, task % num_groups
        lo = g * cg
        mu, r = np.float64(mean[n, g]), np.float64(rstd[n, g])
        sum_g = 0.0
        sum_gx = 0.0
        for i in range(s):
            for j in range(lo, lo + cg):
                xhat = (x[n, i, j] - mu) * r
                gxhat = np.float64(gy[n, i, j]) * scale[j]
                sum_g += gxhat
                sum_gx += gxhat * xhat
                gscale_parts[n, j] += gy[n, i, j] * xhat
                gbias_parts[n, j] += gy[n, i, j]
        m1 = sum_g / (s * cg)
        m2 = sum_gx / (s * cg)
        for i in range(s):
            for j in range(lo, lo + cg):
                xhat = (x[n, i, j] - mu) * r
                gx[n, i, j] = r * (gy[n, i, j] * scale[j] - m1 - xhat * m2)


def groupnorm_forward(x, scale, bias, num_groups: int, eps: float = 1e-6, body: str | None = None):
    """Fused GroupNorm forward; returns what the backward needs.

    Shapes: x (B, S, C), scale (C,), bias (C,) -> y (B, S, C), mean (B, G), rstd (B, G)
    """
    chosen = _dispatch.pick_body("groupnorm_forward", x, body)
    if chosen != "cpu":  # CuPy arrays run the array code
        return groupnorm_forward_ref(x, scale, bias, num_groups, eps)
    _dispatch.cpu_ready()
    x, scale, bias = _dispatch.float32_rows(np, x, scale, bias)
    b = x.shape[0]
    y = np.empty_like(x)
    mean = np.empty((b, num_groups), np.float32)
    rstd = np.empty((b, num_groups), np.float32)
    _forward_cpu(x, scale, bias, num_groups, float(eps), y, mean, rstd)
    return y, mean, rstd


def groupnorm_backward(gy, x, mean, rstd, scale, num_groups: int, body: str | None = None):
    """Fused GroupNorm backward from the saved statistics.

    Shapes: gy, x (B, S, C), mean, rstd (B, G), scale (C,) -> gx (B, S, C), gscale (C,), gbias (C,)
    """
    chosen = _dispatch.pick_body("groupnorm_backward", x, body)
    if chosen != "cpu":
        return groupnorm_backward_ref(gy, x, mean, rstd, scale, num_groups)
    _dispatch.cpu_ready()
    gy, x, mean, rstd, scale = _dispatch.float32_rows(np, gy, x, mean, rstd, scale)
    gx = np.empty_like(x)
    parts = np.zeros((2, x.shape[0], x.shape[2]), np.float64)  # per-sample partial sums
    _backward_cpu(gy, x, mean, rstd, scale, num_groups, gx, parts[0], parts[1])
    gscale, gbias = parts.sum(axis=1).astype(np.float32)  # (C,) each
    return gx, gscale, gbias
