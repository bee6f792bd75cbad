"""relu(a + b), the end of every BiT residual unit, and its backward.

NumPy needs three passes forward (the sum, the maximum, and keeping the result) and two backward
(the mask and the product), each on one core; the Numba bodies do one threaded pass each way. The
backward only needs the output: the gradient passes where it is positive. CuPy arrays run the
array code.
"""

from __future__ import annotations

import numba
import numpy as np

from minivit.kernels import _dispatch


def add_relu_forward_ref(a, b):
    """The spec: max(a + b, 0). Shapes: a, b (same) -> same"""
    y = a + b
    y[y < 0] = 0
    return y


def add_relu_backward_ref(gy, y):
    """The spec of the backward (the same array serves both inputs). Shapes: gy, y -> gy's"""
    return gy * (y > 0)


@_dispatch.cpu_kernel(fastmath=True)
def _forward_cpu(a, b, y):
    for i in numba.prange(y.size):
        y[i] = max(a[i] + b[i], np.float32(0.0))


@_dispatch.cpu_kernel(fastmath=True)
def _backward_cpu(gy, y, g):
    for i in numba.prange(g.size):
        g[i] = gy[i] if y[i] > 0 else np.float32(0.0)


def _flat(*arrays) -> list:
    return [np.ascontiguousarray(a, dtype=np.float32).reshape(-1) for a in arrays]


def add_relu_forward(a, b, body: str | None = None):
    """max(a + b, 0) elementwise. Shapes: a, b (same) -> same"""
    if a.shape != b.shape:
        raise ValueError(f"add_relu: a {a.shape} and b {b.shape} must have one shape")
    if _dispatch.pick_body("add_relu_forward", a, body) != "cpu":
        return add_relu_forward_ref(a, b)
    _dispatch.cpu_ready()
    y = np.empty(a.shape, np.float32)
    _forward_cpu.body(y.size)(*_flat(a, b), y.reshape(-1))
    return y


def add_relu_backward(gy, y, body: str | None = None):
    """The gradient of both summands: gy where the output is positive, else 0."""
    if _dispatch.pick_body("add_relu_backward", gy, body) != "cpu":
        return add_relu_backward_ref(gy, y)
    _dispatch.cpu_ready()
    g = np.empty(gy.shape, np.float32)
    _backward_cpu.body(g.size)(*_flat(gy, y), g.reshape(-1))
    return g
