"""Fused GroupNorm (flax `nn.GroupNorm`, the BiT ResNet norm) over channels-last activations.

Flax defaults: contiguous groups (channel c in group c // (C / G)), statistics per sample and group
over (H*W, C/G) with the fast variance `mean(x^2) - mean(x)^2` clipped at 0, epsilon 1e-6,
`y = (x - mean) * rsqrt(var + eps) * scale + bias`. The forward returns the per-(sample, group)
mean and reciprocal std that the backward reuses. `relu=True` fuses the ReLU that follows every
GroupNorm of a BiT unit but the last (max(y, 0) in the same pass; the backward masks gy with the
forward's output, as a separate ReLU would).

Two bodies: the NumPy reference (the spec; it is also what CuPy arrays run, as array code) and a
Numba CPU body with one thread per sample that walks its rows in memory order twice forward
and twice backward instead of the many full-array passes of the array code.
"""

from __future__ import annotations

import numba
import numpy as np

from minivit import backend
from minivit.kernels import _dispatch


def groupnorm_forward_ref(x, scale, bias, num_groups: int, eps: float = 1e-6, relu: bool = False):
    """The spec, in the array module of x (float64 statistics on NumPy); `relu` applies max(y, 0).

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
    y = xp.maximum(y, 0.0) if relu else y
    return y.astype(x.dtype), mean.astype(x.dtype), rstd.astype(x.dtype)


def groupnorm_backward_ref(gy, x, mean, rstd, scale, num_groups: int, relu_out=None):
    """The spec of the backward; `relu_out` is the forward's output when it applied the ReLU
    (gy passes where it is positive). Shapes: gy, x (B, S, C), mean, rstd (B, G), scale (C,),
    relu_out (B, S, C) or None -> gx (B, S, C), gscale (C,), gbias (C,)"""
    xp = backend.xp_of(x)
    if relu_out is not None:
        gy = gy * (relu_out > 0)
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
def _forward_cpu(x, scale, bias, num_groups, eps, relu, y, mean, rstd):
    b, s, c = x.shape
    cg = c // num_groups
    n_group = s * cg
    for n in numba.prange(b):  # one sample per thread, rows walked in memory order
        sum_x = np.zeros(c)  # per channel first, so the row loop vectorises
        sum_x2 = np.zeros(c)
        for i in range(s):
            for j in range(c):
                v = np.float64(x[n, i, j])
                sum_x[j] += v
                sum_x2[j] += v * v
        total = np.zeros(num_groups)
        total2 = np.zeros(num_groups)
        for j in range(c):
            total[j // cg] += sum_x[j]
            total2[j // cg] += sum_x2[j]
        centre = np.empty(c)  # y = (x - centre) * mul + bias per channel; float64 mean
        mul = np.empty(c, np.float32)
        for g in range(num_groups):
            mu = total[g] / n_group
            r = 1.0 / np.sqrt(max(total2[g] / n_group - mu * mu, 0.0) + eps)
            mean[n, g] = mu
            rstd[n, g] = r
            for j in range(g * cg, (g + 1) * cg):
                mul[j] = r * scale[j]
                centre[j] = mu
        for i in range(s):
            for j in range(c):
                v = np.float32((x[n, i, j] - centre[j]) * mul[j] + bias[j])
                y[n, i, j] = max(v, np.float32(0.0)) if relu else v


@numba.njit(parallel=True, cache=True)
def _backward_cpu(gy, x, mean, rstd, scale, num_groups, relu_out, gx, gscale_parts, gbias_parts):
    b, s, c = x.shape
    cg = c // num_groups
    n_group = s * cg
    for n in numba.prange(b):  # one sample per thread, rows walked in memory order
        sum_gy = np.zeros(c)  # per channel: sum of gy, and of gy * x
        sum_gyx = np.zeros(c)
        masked = relu_out.shape[0] > 0  # gy passes where the fused ReLU's output is positive
        for i in range(s):
            for j in range(c):
                g = gy[n, i, j] if not masked or relu_out[n, i, j] > 0 else np.float32(0.0)
                sum_gy[j] += g
                sum_gyx[j] += np.float64(g) * x[n, i, j]
        # gx = r * (gy * scale - mean(gxhat) - xhat * mean(gxhat * xhat)), xhat = (x - mu) * r,
        # rewritten per channel as gy * a + (x - centre) * bx + d
        centre = np.empty(c, np.float32)
        a = np.empty(c, np.float32)
        bx = np.empty(c, np.float32)
        d = np.empty(c, np.float32)
        for g in range(num_groups):
            mu, r = np.float64(mean[n, g]), np.float64(rstd[n, g])
            m1 = 0.0
            m2 = 0.0
            for j in range(g * cg, (g + 1) * cg):
                gscale_parts[n, j] = (sum_gyx[j] - mu * sum_gy[j]) * r  # sum of gy * xhat
                gbias_parts[n, j] = sum_gy[j]
                m1 += scale[j] * sum_gy[j]
                m2 += scale[j] * gscale_parts[n, j]
            m1 /= n_group
            m2 /= n_group
            for j in range(g * cg, (g + 1) * cg):
                centre[j] = mu
                a[j] = r * scale[j]
                bx[j] = -r * r * m2
                d[j] = -r * m1
        for i in range(s):
            for j in range(c):
                g = gy[n, i, j] if not masked or relu_out[n, i, j] > 0 else np.float32(0.0)
                gx[n, i, j] = g * a[j] + (x[n, i, j] - centre[j]) * bx[j] + d[j]


def groupnorm_forward(
    x, scale, bias, num_groups: int, eps: float = 1e-6, relu: bool = False, body: str | None = None
):
    """Fused GroupNorm forward (and the ReLU after it when `relu`); returns what the backward
    needs. Shapes: x (B, S, C), scale (C,), bias (C,) -> y (B, S, C), mean (B, G), rstd (B, G)
    """
    chosen = _dispatch.pick_body("groupnorm_forward", x, body)
    if chosen != "cpu":  # CuPy arrays run the array code
        return groupnorm_forward_ref(x, scale, bias, num_groups, eps, relu)
    _dispatch.cpu_ready()
    x, scale, bias = _dispatch.float32_rows(np, x, scale, bias)
    b = x.shape[0]
    y = np.empty_like(x)
    mean = np.empty((b, num_groups), np.float32)
    rstd = np.empty((b, num_groups), np.float32)
    _forward_cpu(x, scale, bias, num_groups, float(eps), bool(relu), y, mean, rstd)
    return y, mean, rstd


def groupnorm_backward(
    gy, x, mean, rstd, scale, num_groups: int, relu_out=None, body: str | None = None
):
    """Fused GroupNorm backward from the saved statistics; pass the forward's output as
    `relu_out` when the forward applied the ReLU.

    Shapes: gy, x (B, S, C), mean, rstd (B, G), scale (C,), relu_out (B, S, C) or None ->
    gx (B, S, C), gscale (C,), gbias (C,)
    """
    chosen = _dispatch.pick_body("groupnorm_backward", x, body)
    if chosen != "cpu":
        return groupnorm_backward_ref(gy, x, mean, rstd, scale, num_groups, relu_out)
    _dispatch.cpu_ready()
    gy, x, mean, rstd, scale = _dispatch.float32_rows(np, gy, x, mean, rstd, scale)
    mask = np.empty((0, 0, 0), np.float32) if relu_out is None else np.ascontiguousarray(relu_out)
    gx = np.empty_like(x)
    parts = np.zeros((2, x.shape[0], x.shape[2]), np.float64)  # per-sample partial sums
    _backward_cpu(gy, x, mean, rstd, scale, num_groups, mask, gx, parts[0], parts[1])
    gscale, gbias = parts.sum(axis=1).astype(np.float32)  # (C,) each
    return gx, gscale, gbias
