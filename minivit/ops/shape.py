"""Shape ops: reshape, transpose, concat, index (slices and gathers), pad, broadcast_to.

Forward passes return views where NumPy does; backward passes return fresh or view gradients of
the input's shape (scatters use `add.at`, so repeated indices accumulate).
"""

from __future__ import annotations

import numpy as np

from minivit.autograd import Function, Tensor
from minivit.ops.elementwise import as_dtype, float_dtype, sum_to_shape


class Reshape(Function):
    """A new shape for the same elements (one axis may be -1). Shapes: x -> y (shape)"""

    def __init__(self, shape):
        self.shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)

    def forward(self, xp, x):
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise self.shape_error(
                f"cannot reshape an input of shape {x.shape} ({x.size} elements) into {self.shape}"
            ) from None

    def backward(self, xp, gy):
        return gy.reshape(self.inputs[0].shape)


class Transpose(Function):
    """Permute axes (reverse them when `axes` is None). Shapes: x -> y (x.shape[axes])"""

    def __init__(self, axes=None):
        self.axes = None if axes is None else tuple(int(a) for a in axes)

    def forward(self, xp, x):
        if self.axes is None:
            self.axes = tuple(range(x.ndim))[::-1]
        if sorted(a % x.ndim if x.ndim else a for a in self.axes) != list(range(x.ndim)):
            raise self.shape_error(
                f"axes {self.axes} are not a permutation of the axes of shape {x.shape}"
            )
        return x.transpose(self.axes)

    def backward(self, xp, gy):
        inverse = np.argsort([a % gy.ndim for a in self.axes])
        return gy.transpose(tuple(int(a) for a in inverse))


class Concat(Function):
    """Join arrays along one axis. Shapes: xs[i] (..., n_i, ...) -> y (..., sum n_i, ...)"""

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, xp, *xs):
        first = xs[0].shape
        ndim = len(first)
        if not -ndim <= self.axis < ndim:
            raise self.shape_error(f"axis {self.axis} is out of range for shape {first}")
        self.axis %= ndim
        for x in xs[1:]:
            others = [n for i, n in enumerate(x.shape) if i != self.axis]
            if x.ndim != ndim or others != [n for i, n in enumerate(first) if i != self.axis]:
                raise self.shape_error(
                    f"shapes {first} and {x.shape} differ outside axis {self.axis}; "
                    "only the concatenation axis may differ"
                )
        return xp.concatenate(as_dtype(xs, float_dtype(*(x.dtype for x in xs))), axis=self.axis)

    def backward(self, xp, gy):
        grads, start = [], 0
        for tensor, needed in zip(self.inputs, self.needs_grad):
            stop = start + tensor.shape[self.axis]
            cut = (slice(None),) * self.axis + (slice(start, stop),)
            grads.append(gy[cut] if needed else None)
            start = stop
        return tuple(grads)


def _is_basic(index) -> bool:
    """True for indices made of ints, slices, None and Ellipsis (NumPy basic indexing)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(
        (isinstance(i, int | np.integer) and not isinstance(i, bool))
        or i is None
        or i is Ellipsis
        or isinstance(i, slice)
        for i in items
    )


class Index(Function):
    """x[index] with NumPy semantics (slices, integers, integer/boolean arrays).

    Shapes: x -> y (x[index].shape)
    """

    def __init__(self, index):
        items = index if isinstance(index, tuple) else (index,)
        items = tuple(i.data if isinstance(i, Tensor) else i for i in items)
        self.index = items if isinstance(index, tuple) else items[0]

    def forward(self, xp, x):
        try:
            return x[self.index]
        except IndexError as error:
            raise IndexError(f"Index: {error} (input of shape {x.shape})") from None

    def backward(self, xp, gy):
        gx = xp.zeros(self.inputs[0].shape, dtype=gy.dtype)
        if _is_basic(self.index):
            gx[self.index] = gy
        else:
            xp.add.at(gx, self.index, gy)  # repeated indices accumulate
        return gx


class Pad(Function):
    """Constant padding, `pad_width` as in `numpy.pad`. Shapes: x -> y (x grown by the pads)"""

    def __init__(self, pad_width, value: float = 0.0):
        self.pad_width = pad_width
        self.value = value

    def forward(self, xp, x):
        try:
            widths = np.broadcast_to(np.asarray(self.pad_width, dtype=np.int64), (x.ndim, 2))
        except ValueError:
            widths = None
        if widths is None or (widths < 0).any():
            raise self.shape_error(
                f"pad_width {self.pad_width} does not fit an input of shape {x.shape}; "
                "give (before, after) >= 0 per axis"
            )
        self.widths = tuple((int(b), int(a)) for b, a in widths)
        return xp.pad(x, self.widths, mode="constant", constant_values=self.value)

    def backward(self, xp, gy):
        return gy[tuple(slice(b, b + n) for (b, _), n in zip(self.widths, self.inputs[0].shape))]


class BroadcastTo(Function):
    """Broadcast to a larger shape (a read-only view). Shapes: x -> y (shape)"""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, xp, x):
        try:
            return xp.broadcast_to(x, self.shape)
        except ValueError:
            raise self.shape_error(f"cannot broadcast shape {x.shape} to {self.shape}") from None

    def backward(self, xp, gy):
        return sum_to_shape(gy, self.inputs[0].shape)


def reshape(x, shape) -> Tensor:
    """The same elements in a new shape. Shapes: x -> shape"""
    return Reshape(shape)(x)


def transpose(x, axes=None) -> Tensor:
    """Permute axes; reverse them when `axes` is None. Shapes: x -> x.shape permuted"""
    return Transpose(axes)(x)


def concat(xs, axis: int = 0) -> Tensor:
    """Concatenate along `axis`. Shapes: xs[i] (..., n_i, ...) -> (..., sum n_i, ...)"""
    xs = list(xs)
    if not xs:
        raise ValueError("Concat: needs at least one input")
    return Concat(axis)(*xs)


def index(x, idx) -> Tensor:
    """x[idx]: slices, integers, integer or boolean arrays. Shapes: x -> x[idx].shape"""
    return Index(idx)(x)


def pad(x, pad_width, value: float = 0.0) -> Tensor:
    """Pad with a constant; `pad_width` as in numpy.pad. Shapes: x -> padded"""
    return Pad(pad_width, value)(x)


def broadcast_to(x, shape) -> Tensor:
    """Broadcast to `shape` (the gradient is summed back). Shapes: x -> shape"""
    return BroadcastTo(shape)(x)
