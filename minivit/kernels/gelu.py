"""GELU fused with the bias add of the Dense layer before it (Hendrycks & Gimpel 2016).

`y = gelu(x + bias)`, so `gelu(x @ W + b)` costs one pass over the activations, not two. Two forms:
`approximate=True` is `0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))`, the one flax `nn.gelu`
(and so every official ViT and Mixer MlpBlock) uses; `approximate=False` is the exact
`z Phi(z) = 0.5 z (1 + erf(z / sqrt(2)))`.

The CPU body rewrites both without cancellation and without scalar libm calls:
tanh form `y = z * sigmoid(2u)` with `u = sqrt(2/pi) (z + 0.044715 z^3)`; erf form through
`Phi(z) = 1 - q/2` (z >= 0) or `q/2` (z < 0) with `q = erfc(|z|/sqrt(2))` from Abramowitz &
Stegun 7.1.26 (absolute error <= 1.5e-7 on erf).
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

GPU_THREADS = 256  # threads per block of the elementwise GPU kernels

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Abramowitz & Stegun 7.1.26: erfc(x) ~ t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + P x)
_AS_P = 0.3275911
_AS_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)  # a5 .. a1


def _shifted_ref(x, bias):
    z = np.asarray(x, dtype=np.float64)
    return z if bias is None else z + np.asarray(bias, dtype=np.float64)  # (R, M)


def gelu_forward_ref(x, bias=None, approximate: bool = True):
    """The spec, plain NumPy (scipy's erf for the exact form) in float64.

    Shapes: x (R, M), bias (M,) or None -> y (R, M)
    """
    z = _shifted_ref(x, bias)
    if approximate:
        y = 0.5 * z * (1.0 + np.tanh(_C * (z + _A * z * z * z)))
    else:
        from scipy.special import erf  # noqa: PLC0415

        y = 0.5 * z * (1.0 + erf(z * _INV_SQRT2))
    return y.astype(np.float32)


def gelu_backward_ref(gy, x, bias=None, approximate: bool = True):
    """The spec of the backward: gy * gelu'(x + bias); the bias gradient is gx.sum(0).

    Shapes: gy (R, M), x (R, M), bias (M,) or None -> gx (R, M)
    """
    z = _shifted_ref(x, bias)
    if approximate:
        t = np.tanh(_C * (z + _A * z * z * z))
        slope = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * z * z)
    else:
        from scipy.special import erf  # noqa: PLC0415

        slope = 0.5 * (1.0 + erf(z * _INV_SQRT2)) + z * _INV_SQRT_2PI * np.exp(-0.5 * z * z)
    return (np.asarray(gy, dtype=np.float64) * slope).astype(np.float32)


@numba.njit(inline="always", fastmath=True, cache=True)
def _tanh_parts(z):
    """sigmoid(2u) and 2 sigmoid'(2u) du/dz for u = sqrt(2/pi) (z + 0.044715 z^3)."""
    u = np.float32(_C) * (z + np.float32(_A) * z * z * z)
    # Capped at e^40, e^2 and s^2 stay normal float32 numbers however fast-math regroups the
    # products below (uncapped, the vectorised slope was NaN from z = -10); for 2u < -40 this
    # gives s = 4e-18 instead of less, an absolute error below 2e-16 in y at z = -40
    e = exp32(min(np.float32(-2.0) * u, np.float32(40.0)))
    s = np.float32(1.0) / (np.float32(1.0) + e)  # sigmoid(2u) = (1 + tanh u) / 2
    du = np.float32(_C) * (np.float32(1.0) + np.float32(3.0 * _A) * z * z)
    return s, np.float32(2.0) * s * (e * s) * du  # 1 - s = e s


@numba.njit(inline="always", fastmath=True, cache=True)
def _phi_parts(z):
    """Phi(z) (standard normal CDF) and its density phi(z)."""
    w = abs(z) * np.float32(_INV_SQRT2)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(_AS_P) * w)
    p = np.float32(_AS_A[0])
    for a in _AS_A[1:]:
        p = p * t + np.float32(a)
    g = exp32(-w * w)
    half_q = np.float32(0.5) * t * p * g  # erfc(w) / 2
    cdf = half_q if z < 0 else np.float32(1.0) - half_q
    return cdf, np.float32(_INV_SQRT_2PI) * g  # exp(-z^2/2) = exp(-w^2)


@_dispatch.cpu_kernel(fastmath=True)
def _forward_cpu(x, bias, approximate, y):
    for r in numba.prange(x.shape[0]):
        if approximate:  # the form is chosen outside the column loop so that loop vectorises
            for j in range(x.shape[1]):
                z = x[r, j] + bias[j]
                y[r, j] = z * _tanh_parts(z)[0]
        else:
            for j in range(x.shape[1]):
                z = x[r, j] + bias[j]
                y[r, j] = z * _phi_parts(z)[0]


@_dispatch.cpu_kernel(fastmath=True)
def _backward_cpu(gy, x, bias, approximate, gx):
    for r in numba.prange(x.shape[0]):
        if approximate:
            for j in range(x.shape[1]):
                z = x[r, j] + bias[j]
                s, ds = _tanh_parts(z)
                gx[r, j] = gy[r, j] * (s + z * ds)
        else:
            for j in range(x.shape[1]):
                z = x[r, j] + bias[j]
                s, ds = _phi_parts(z)
                gx[r, j] = gy[r, j] * (s + z * ds)


def _forward_cpu_body(x, bias, approximate):
    _dispatch.cpu_ready()
    y = np.empty_like(x)
    _forward_cpu.body(x.size)(x, bias, approximate, y)
    return y


def _backward_cpu_body(gy, x, bias, approximate):
    _dispatch.cpu_ready()
    gx = np.empty_like(x)
    _backward_cpu.body(x.size)(gy, x, bias, approximate, gx)
    return gx


@functools.cache
def _gpu_kernels():
    """Compile the GPU kernels on first use."""

    f32 = numba.float32  # float32 constants keep the math in float32 on the GPU

    @cuda.jit(device=True)
    def slope_parts(z, approximate):
        """Phi-like factor s with y = z s, and ds/dz (tanh or erf form)."""
        if approximate:
            t = math.tanh(f32(_C) * (z + f32(_A) * z * z * z))
            ds = f32(0.5) * (f32(1.0) - t * t) * f32(_C) * (f32(1.0) + f32(3.0 * _A) * z * z)
            return f32(0.5) * (f32(1.0) + t), ds
        density = f32(_INV_SQRT_2PI) * math.exp(f32(-0.5) * z * z)
        return f32(0.5) * (f32(1.0) + math.erf(z * f32(_INV_SQRT2))), density

    @cuda.jit
    def forward(x, bias, approximate, y):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            r, j = i // x.shape[1], i % x.shape[1]
            z = x[r, j] + bias[j]
            y[r, j] = z * slope_parts(z, approximate)[0]

    @cuda.jit
    def backward(gy, x, bias, approximate, gx):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            r, j = i // x.shape[1], i % x.shape[1]
            z = x[r, j] + bias[j]
            s, ds = slope_parts(z, approximate)
            gx[r, j] = gy[r, j] * (s + z * ds)

    return forward, backward


def _launch(x) -> tuple[int, int]:
    return min(_dispatch.blocks(x.size, GPU_THREADS), 65535), GPU_THREADS


def _forward_gpu_body(x, bias, approximate):
    y = backend.xp_of(x).empty_like(x)
    _gpu_kernels()[0][_launch(x)](x, bias, approximate, y)
    return y


def _backward_gpu_body(gy, x, bias, approximate):
    gx = backend.xp_of(x).empty_like(x)
    _gpu_kernels()[1][_launch(x)](gy, x, bias, approximate, gx)
    return gx


def _prepared(kernel: str, x, bias, *more):
    """float32 C-contiguous copies of the inputs; a zero bias stands in for None."""
    _dispatch.check_2d(kernel, "x", x)
    xp = backend.xp_of(x)
    if bias is None:
        bias = xp.zeros(x.shape[1], np.float32)
    if bias.shape != (x.shape[1],):
        raise ValueError(
            f"{kernel}: bias has shape {tuple(bias.shape)} but x has {x.shape[1]} columns; "
            "pass a bias of shape (M,)"
        )
    return _dispatch.float32_rows(xp, *more, x, bias)


def gelu_forward(x, bias=None, approximate: bool = True, body: str | None = None):
    """Fused `gelu(x + bias)`.

    Shapes: x (R, M), bias (M,) or None -> y (R, M)
    """
    chosen = _dispatch.pick_body("gelu_forward", x, body)
    if chosen == "ref":
        return gelu_forward_ref(x, bias, approximate)
    x, bias = _prepared("gelu_forward", x, bias)
    run = _forward_cpu_body if chosen == "cpu" else _forward_gpu_body
    return run(x, bias, bool(approximate))


def gelu_backward(gy, x, bias=None, approximate: bool = True, body: str | None = None):
    """Gradient with respect to `x + bias` (so also to x); the bias gradient is `gx.sum(0)`.

    Shapes: gy (R, M), x (R, M), bias (M,) or None -> gx (R, M)
    """
    chosen = _dispatch.pick_body("gelu_backward", x, body)
    if chosen == "ref":
        return gelu_backward_ref(gy, x, bias, approximate)
    gy, x, bias = _prepared("gelu_backward", x, bias, gy)
    run = _backward_cpu_body if chosen == "cpu" else _backward_gpu_body
    return run(gy, x, bias, bool(approximate))
