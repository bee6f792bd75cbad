"""Elementwise ops: broadcasting arithmetic, pointwise nonlinearities, GELU and dropout.

Binary ops follow NumPy broadcasting and each backward sums its gradient back to the input's
shape. Dtypes follow the float32 policy: operands of mixed float precision compute in float32,
integer or boolean operands take the float dtype of the other operand, and every gradient comes
back in its input's dtype. GELU and dropout match flax (`nn.gelu`, `nn.Dropout`).
"""

from __future__ import annotations

import functools
import importlib
import math

import numpy as np

from minivit import backend, kernels
from minivit.autograd import Function, Tensor, as_tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715  # the cubic coefficient of the tanh approximation (jax.nn.gelu)


# ---- helpers shared by the ops modules -------------------------------------------------------
def float_dtype(*dtypes) -> np.dtype:
    """The dtype an op computes in: float32 if any operand is float32, else their float type."""
    for d in dtypes:  # the common case first: np.issubdtype costs ~1 us a call
        if d == np.float32:
            return np.dtype(backend.DTYPE)
    floats = [np.dtype(d) for d in dtypes if np.issubdtype(d, np.floating)]
    if not floats or any(d == np.float32 for d in floats):
        return np.dtype(backend.DTYPE)
    return np.result_type(*floats)


def as_dtype(arrays, dtype) -> list:
    """`arrays` converted to `dtype` (no copy for those already in it)."""
    return [a if a.dtype == dtype else a.astype(dtype) for a in arrays]


def sum_to_shape(g, shape: tuple[int, ...]):
    """Sum a broadcast gradient back to the shape of the input it was broadcast from.

    Shapes: g (broadcast shape) -> shape
    """
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=ones, keepdims=True) if ones else g


def expand_to(xp, g, shape: tuple[int, ...]):
    """A fresh, writable array of `shape` holding `g` broadcast (gradients must not alias)."""
    out = xp.empty(shape, dtype=g.dtype)
    out[...] = g
    return out


def _grad_for(tensor: Tensor, g):
    """`g` summed to the input's shape and cast to its dtype."""
    g = sum_to_shape(g, tensor.shape)
    return g if g.dtype == tensor.dtype else g.astype(tensor.dtype)


def _operands(op: Function, a, b) -> list:
    """Check that a and b broadcast together and bring them to one float dtype."""
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise op.shape_error(
            f"shapes {a.shape} and {b.shape} do not broadcast; make each axis equal or 1"
        ) from None
    return as_dtype((a, b), float_dtype(a.dtype, b.dtype))


def _weak_scalars(a, b) -> tuple:
    """Python numbers take the other operand's float dtype and device (NumPy's weak scalars)."""
    if isinstance(a, int | float) and not isinstance(b, int | float):
        return _scalar_like(a, b), b
    if isinstance(b, int | float) and not isinstance(a, int | float):
        return a, _scalar_like(b, a)
    return a, b


def _scalar_like(value: float, other) -> Tensor:
    other = as_tensor(other)
    floating = np.issubdtype(other.dtype, np.floating)
    return Tensor(other.xp.asarray(value, dtype=other.dtype if floating else backend.DTYPE))


# ---- binary arithmetic -----------------------------------------------------------------------
class Add(Function):
    """a + b with broadcasting. Shapes: a, b broadcastable -> y (broadcast shape)"""

    def forward(self, xp, a, b):
        a, b = _operands(self, a, b)
        return a + b

    def backward(self, xp, gy):
        ga = _grad_for(self.inputs[0], gy) if self.needs_grad[0] else None
        gb = _grad_for(self.inputs[1], gy) if self.needs_grad[1] else None
        return ga, gb  # possibly one array: autograd copies it if two leaves would share it


class AddRelu(Function):
    """relu(a + b) for two arrays of one shape, the end of a BiT residual unit; the fused kernel
    for float32. Shapes: a, b (same) -> y (same)"""

    def forward(self, xp, a, b):
        if a.shape != b.shape:
            raise self.shape_error(f"a {a.shape} and b {b.shape} must have one shape")
        a, b = _operands(self, a, b)
        self.fused = kernels.fusable(a, b)
        y = kernels.add_relu_forward(a, b) if self.fused else xp.maximum(a + b, 0)
        self.save(y)
        return y

    def backward(self, xp, gy):
        (y,) = self.saved
        g = kernels.add_relu_backward(gy, y) if self.fused else gy * (y > 0)
        return tuple(g if needed else None for needed in self.needs_grad)  # one array, both


class Sub(Function):
    """a - b with broadcasting. Shapes: a, b broadcastable -> y (broadcast shape)"""

    def forward(self, xp, a, b):
        a, b = _operands(self, a, b)
        return a - b

    def backward(self, xp, gy):
        ga = _grad_for(self.inputs[0], gy) if self.needs_grad[0] else None
        gb = _grad_for(self.inputs[1], -gy) if self.needs_grad[1] else None
        return ga, gb


class Mul(Function):
    """a * b with broadcasting. Shapes: a, b broadcastable -> y (broadcast shape)"""

    def forward(self, xp, a, b):
        a, b = _operands(self, a, b)
        self.save(a, b)
        return a * b

    def backward(self, xp, gy):
        a, b = self.saved
        ga = _grad_for(self.inputs[0], gy * b) if self.needs_grad[0] else None
        gb = _grad_for(self.inputs[1], gy * a) if self.needs_grad[1] else None
        return ga, gb


class Div(Function):
    """a / b with broadcasting. Shapes: a, b broadcastable -> y (broadcast shape)"""

    def forward(self, xp, a, b):
        a, b = _operands(self, a, b)
        self.save(a, b)
        return a / b

    def backward(self, xp, gy):
        a, b = self.saved
        ga = _grad_for(self.inputs[0], gy / b) if self.needs_grad[0] else None
        gb = _grad_for(self.inputs[1], -gy * a / (b * b)) if self.needs_grad[1] else None
        return ga, gb


# ---- unary nonlinearities --------------------------------------------------------------------
class Neg(Function):
    """-x. Shapes: x -> y (same)"""

    def forward(self, xp, x):
        return -x

    def backward(self, xp, gy):
        return -gy


class Exp(Function):
    """exp(x). Shapes: x -> y (same)"""

    def forward(self, xp, x):
        y = xp.exp(x)
        self.save(y)
        return y

    def backward(self, xp, gy):
        (y,) = self.saved
        return gy * y


class Log(Function):
    """Natural logarithm. Shapes: x -> y (same)"""

    def forward(self, xp, x):
        self.save(x)
        return xp.log(x)

    def backward(self, xp, gy):
        (x,) = self.saved
        return gy / x


class Tanh(Function):
    """tanh(x). Shapes: x -> y (same)"""

    def forward(self, xp, x):
        y = xp.tanh(x)
        self.save(y)
        return y

    def backward(self, xp, gy):
        (y,) = self.saved
        return gy * (1.0 - y * y)


class Relu(Function):
    """max(x, 0); the gradient at 0 is 0. Shapes: x -> y (same)"""

    def forward(self, xp, x):
        y = xp.maximum(x, 0)
        self.save(y)
        return y

    def backward(self, xp, gy):
        (y,) = self.saved
        return gy * (y > 0)


class Sqrt(Function):
    """Square root. Shapes: x -> y (same)"""

    def forward(self, xp, x):
        y = xp.sqrt(x)
        self.save(y)
        return y

    def backward(self, xp, gy):
        (y,) = self.saved
        return 0.5 * gy / y


# ---- GELU and dropout ------------------------------------------------------------------------
def _erfc_scalar(v):
    return math.erfc(v)


@functools.cache
def _erfc_ufunc():
    """libm's erfc as a NumPy ufunc (float32 and float64 loops), compiled by Numba on first use."""
    import numba  # noqa: PLC0415  (heavy import, only the erf GELU needs it)

    return numba.vectorize(["float32(float32)", "float64(float64)"], cache=True)(_erfc_scalar)


def normal_cdf(xp, x):
    """Phi(x) = erfc(-x / sqrt(2)) / 2, accurate in both tails (NumPy has no erf; CuPy's lives
    in cupyx)."""
    if xp is np:
        erfc = _erfc_ufunc()
    else:
        erfc = importlib.import_module("cupyx.scipy.special").erfc
    return 0.5 * erfc(x * -_SQRT_HALF)


def gelu_values(xp, x, approximate: bool):
    """GELU of an array, plain array code (the tanh or the erf form)."""
    if approximate:
        inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * (x * x * x))
        return x * (0.5 * (1.0 + xp.tanh(inner)))
    return x * normal_cdf(xp, x)


def gelu_grad(xp, gy, x, approximate: bool):
    """gy times the derivative of GELU at x, plain array code."""
    x2 = x * x
    if approximate:
        t = xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * (x2 * x)))
        slope = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x2)
        return gy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * slope)
    return gy * (normal_cdf(xp, x) + x * (_INV_SQRT_2PI * xp.exp(-0.5 * x2)))


class Gelu(Function):
    """GELU, tanh approximation (flax `nn.gelu`, the official one) or exact erf form.

    Shapes: x -> y (same). tanh: x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)));
    erf: x * Phi(x) = x * 0.5 * (1 + erf(x / sqrt(2))), computed through erfc so that the
    tails keep their precision.
    """

    def __init__(self, approximate: bool = True):
        self.approximate = approximate

    def forward(self, xp, x):
        self.save(x)
        if kernels.fusable(x) and x.ndim:
            rows = x.reshape(-1, x.shape[-1])  # (R, M)
            return kernels.gelu_forward(rows, None, self.approximate).reshape(x.shape)
        return gelu_values(xp, x, self.approximate)

    def backward(self, xp, gy):
        (x,) = self.saved
        if kernels.fusable(x, gy) and x.ndim:
            rows = x.reshape(-1, x.shape[-1])  # (R, M)
            gx = kernels.gelu_backward(gy.reshape(rows.shape), rows, None, self.approximate)
            return gx.reshape(x.shape)
        return gelu_grad(xp, gy, x, self.approximate)


class Dropout(Function):
    """Inverted dropout as flax `nn.Dropout`: keep with probability 1 - rate, scale by 1/(1-rate).

    Shapes: x -> y (same). The mask is drawn on the host from `rng` (a np.random.Generator), so a
    seed gives the same mask on every device.
    """

    def __init__(self, rate: float, rng: np.random.Generator):
        self.rate = rate
        self.rng = rng

    def forward(self, xp, x):
        keep = 1.0 - self.rate
        mask = xp.asarray(self.rng.random(x.shape, dtype=np.float32) < keep)
        self.scale = 1.0 / keep if keep > 0 else 0.0  # rate 1 drops everything, as flax does
        self.save(mask)
        return xp.where(mask, x * self.scale, 0)

    def backward(self, xp, gy):
        (mask,) = self.saved
        return xp.where(mask, gy * self.scale, 0)


# ---- public functions ------------------------------------------------------------------------
def add(a, b) -> Tensor:
    """a + b with broadcasting. Shapes: a, b broadcastable -> broadcast shape"""
    return Add()(*_weak_scalars(a, b))


def sub(a, b) -> Tensor:
    """a - b with broadcasting. Shapes: a, b broadcastable -> broadcast shape"""
    return Sub()(*_weak_scalars(a, b))


def mul(a, b) -> Tensor:
    """a * b with broadcasting. Shapes: a, b broadcastable -> broadcast shape"""
    return Mul()(*_weak_scalars(a, b))


def div(a, b) -> Tensor:
    """a / b with broadcasting. Shapes: a, b broadcastable -> broadcast shape"""
    return Div()(*_weak_scalars(a, b))


def neg(x) -> Tensor:
    """-x. Shapes: x -> same"""
    return Neg()(x)


def exp(x) -> Tensor:
    """exp(x). Shapes: x -> same"""
    return Exp()(x)


def log(x) -> Tensor:
    """Natural logarithm. Shapes: x -> same"""
    return Log()(x)


def tanh(x) -> Tensor:
    """tanh(x). Shapes: x -> same"""
    return Tanh()(x)


def relu(x) -> Tensor:
    """max(x, 0). Shapes: x -> same"""
    return Relu()(x)


def sqrt(x) -> Tensor:
    """Square root. Shapes: x -> same"""
    return Sqrt()(x)


def gelu(x, approximate: bool = True) -> Tensor:
    """GELU; `approximate=True` is the tanh form the official models use (flax `nn.gelu`).

    Shapes: x -> same
    """
    return Gelu(approximate)(x)


def add_relu(a, b) -> Tensor:
    """relu(a + b) as one op; a and b of one shape. Shapes: a, b -> same"""
    return AddRelu()(a, b)


def dropout(x, rate: float, rng: np.random.Generator | None = None) -> Tensor:
    """Training-time dropout (flax `nn.Dropout`); the identity when `rate` is 0.

    Shapes: x -> same
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout: rate must lie in [0, 1], got {rate}")
    if rate == 0.0:
        return as_tensor(x)
    if rng is None:
        raise ValueError(f"dropout: rate {rate} needs rng, a np.random.Generator")
    return Dropout(rate, rng)(x)
