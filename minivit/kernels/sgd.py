"""The SGD-with-momentum update as one pass over each parameter (the optimiser's hot loop).

`minivit.optim.SGDMomentum` keeps the plain array version (the spec, any array module); these
Numba bodies do the same arithmetic in one pass per parameter on the CPU instead of the
concatenate / decode / round / scale / subtract passes of the array version:
`m_new = g + beta * m` (float32), `param -= lr * m_new` (float32), stored `m` = `m_new`, rounded
to bfloat16 (nearest even) for the bfloat16 buffer. No fastmath: a fused multiply-add would round
differently from the spec. Each body is a `_dispatch.CpuKernel`: the biases and norm scales (a
few hundred elements) run on the calling thread.
"""

from __future__ import annotations

import numba
import numpy as np

from minivit.kernels._dispatch import cpu_kernel
from minivit.kernels._vecmath import bfloat16_round, bfloat16_value


@cpu_kernel()
def sgd_momentum_bf16_cpu(param, grad, bits, beta, lr):
    """One update of a flat float32 parameter with a bfloat16 (uint16 bits) momentum slice.

    Shapes: param (P,), grad (P,), bits (P,) uint16; beta, lr float32 scalars
    """
    for i in numba.prange(param.size):
        m_new = grad[i] + beta * bfloat16_value(bits[i])
        bits[i] = np.uint16(bfloat16_round(m_new))
        param[i] = param[i] - lr * m_new


@cpu_kernel()
def sgd_momentum_f32_cpu(param, grad, momentum, beta, lr):
    """One update of a flat float32 parameter with a float32 momentum slice.

    Shapes: param (P,), grad (P,), momentum (P,); beta, lr float32 scalars
    """
    for i in numba.prange(param.size):
        m_new = grad[i] + beta * momentum[i]
        momentum[i] = m_new
        param[i] = param[i] - lr * m_new


@cpu_kernel()
def sum_of_squares_cpu(x):
    """sum(x**2) of a flat float32 array, accumulated in float64. Shapes: x (P,) -> ()"""
    total = 0.0
    for i in numba.prange(x.size):
        total += np.float64(x[i]) * np.float64(x[i])
    return total
