"""Reductions over axes (sum, mean, max) and the softmax family (softmax, log-softmax).

`max` sends the gradient to the maximal elements; when several elements tie for the maximum the
gradient is split evenly among them (a valid subgradient that keeps the op symmetric).
"""

from __future__ import annotations

import math

from minivit.autograd import Function, Tensor
from minivit.ops.elementwise import expand_to


def _axes(op: Function, axis, shape: tuple[int, ...]) -> tuple[int, ...]:
    """`axis` (None, an int or a sequence) as sorted non-negative axes of `shape`."""
    ndim = len(shape)
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if any(not -ndim <= a < ndim for a in axes):
        raise op.shape_error(f"axis {axis} is out of range for an input of shape {shape}")
    normal = tuple(sorted(a % ndim for a in axes))
    if len(set(normal)) != len(normal):
        raise op.shape_error(f"axis {axis} repeats an axis of shape {shape}")
    return normal


def _kept_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` with the reduced axes set to 1 (the keepdims shape)."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


class Sum(Function):
    """Sum over axes. Shapes: x -> y (x without `axis`, or with it as 1 when keepdims)"""

    def __init__(self, axis=None, keepdims: bool = False):
        self.axis = axis
        self.keepdims = keepdims

    def forward(self, xp, x):
        self.axes = _axes(self, self.axis, x.shape)
        return xp.asarray(x.sum(axis=self.axes, keepdims=self.keepdims))

    def backward(self, xp, gy):
        shape = self.inputs[0].shape
        return expand_to(xp, gy.reshape(_kept_shape(shape, self.axes)), shape)


class Mean(Function):
    """Mean over axes. Shapes: x -> y (x without `axis`, or with it as 1 when keepdims)"""

    def __init__(self, axis=None, keepdims: bool = False):
        self.axis = axis
        self.keepdims = keepdims

    def forward(self, xp, x):
        self.axes = _axes(self, self.axis, x.shape)
        return xp.asarray(x.mean(axis=self.axes, keepdims=self.keepdims))

    def backward(self, xp, gy):
        shape = self.inputs[0].shape
        count = math.prod(shape[a] for a in self.axes)
        return expand_to(xp, gy.reshape(_kept_shape(shape, self.axes)) / count, shape)


class Max(Function):
    """Maximum over axes; ties share the gradient evenly.

    Shapes: x -> y (x without `axis`, or with it as 1 when keepdims)
    """

    def __init__(self, axis=None, keepdims: bool = False):
        self.axis = axis
        self.keepdims = keepdims

    def forward(self, xp, x):
        self.axes = _axes(self, self.axis, x.shape)
        if x.size == 0:
            raise self.shape_error(f"cannot take the maximum of an empty input of shape {x.shape}")
        top = x.max(axis=self.axes, keepdims=True)  # (kept shape)
        mask = x == top
        self.save(mask, mask.sum(axis=self.axes, keepdims=True, dtype=x.dtype))
        if self.keepdims:
            return top
        return top.reshape([n for i, n in enumerate(x.shape) if i not in self.axes])

    def backward(self, xp, gy):
        mask, ties = self.saved
        return mask * (gy.reshape(ties.shape) / ties)


class Softmax(Function):
    """exp(x) normalised to sum 1 along `axis`. Shapes: x -> y (same)"""

    def __init__(self, axis: int = -1):
        self.axis = axis

    def forward(self, xp, x):
        _axes(self, self.axis, x.shape)
        z = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        y = z / z.sum(axis=self.axis, keepdims=True)
        self.save(y)
        return y

    def backward(self, xp, gy):
        (y,) = self.saved
        return y * (gy - (gy * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    """x minus the log-sum-exp along `axis`. Shapes: x -> y (same)"""

    def __init__(self, axis: int = -1):
        self.axis = axis

    def forward(self, xp, x):
        _axes(self, self.axis, x.shape)
        z = x - x.max(axis=self.axis, keepdims=True)
        y = z - xp.log(xp.exp(z).sum(axis=self.axis, keepdims=True))
        self.save(y)
        return y

    def backward(self, xp, gy):
        (y,) = self.saved
        return gy - xp.exp(y) * gy.sum(axis=self.axis, keepdims=True)


def sum(x, axis=None, keepdims: bool = False) -> Tensor:
    """Sum over `axis` (all axes when None). Shapes: x -> reduced"""
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over `axis` (all axes when None). Shapes: x -> reduced"""
    return Mean(axis, keepdims)(x)


def max(x, axis=None, keepdims: bool = False) -> Tensor:
    """Maximum over `axis`; tied maxima share the gradient evenly. Shapes: x -> reduced"""
    return Max(axis, keepdims)(x)


def softmax(x, axis: int = -1) -> Tensor:
    """Softmax along `axis`. Shapes: x -> same"""
    return Softmax(axis)(x)


def log_softmax(x, axis: int = -1) -> Tensor:
    """Log-softmax along `axis`. Shapes: x -> same"""
    return LogSoftmax(axis)(x)
