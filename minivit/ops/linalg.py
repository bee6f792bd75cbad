"""Matrix products: `matmul` with broadcast batch axes and the flax `Dense` layer map.

Products against a 2-D right operand (every Dense, every Mixer and attention projection) run as
one GEMM on the rows of the left operand, forward and backward, so BLAS sees large matrices;
`kernels.matmul` makes each one sgemm call that reads transposed operands in place.
"""

from __future__ import annotations

import math

import numpy as np

from minivit import kernels
from minivit.autograd import Function, Tensor, as_tensor
from minivit.ops.elementwise import as_dtype, float_dtype, gelu_grad, gelu_values, sum_to_shape
from minivit.ops.shape import reshape


class MatMul(Function):
    """a @ b over the last two axes; leading (batch) axes broadcast.

    Shapes: a (..., M, K), b (..., K, N) -> y (..., M, N)
    """

    def forward(self, xp, a, b):
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise self.shape_error(
                f"cannot multiply shapes {a.shape} and {b.shape}; "
                "the last axis of a must equal the second-to-last axis of b"
            )
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise self.shape_error(
                f"batch axes of shapes {a.shape} and {b.shape} do not broadcast"
            ) from None
        a, b = as_dtype((a, b), float_dtype(a.dtype, b.dtype))
        self.save(a, b)
        if b.ndim == 2:  # one GEMM on the rows of a
            y = kernels.matmul(a.reshape(-1, a.shape[-1]), b)  # (R, N)
            return y.reshape(*a.shape[:-1], b.shape[1])
        return a @ b

    def backward(self, xp, gy):
        a, b = self.saved
        ga = gb = None
        if b.ndim == 2:
            gy_rows = gy.reshape(-1, gy.shape[-1])  # (R, N)
            if self.needs_grad[0]:
                ga = kernels.matmul(gy_rows, b.T).reshape(a.shape)  # (..., M, K)
            if self.needs_grad[1]:
                gb = kernels.matmul(a.reshape(-1, a.shape[-1]).T, gy_rows)  # (K, N)
        else:
            if self.needs_grad[0]:
                ga = sum_to_shape(gy @ xp.swapaxes(b, -1, -2), a.shape)  # (..., M, K)
            if self.needs_grad[1]:
                gb = sum_to_shape(xp.swapaxes(a, -1, -2) @ gy, b.shape)  # (..., K, N)
        return ga, gb


class Dense(Function):
    """Affine map over the last axis, in the flax `Dense` layout; with `in_axes` > 1 or a kernel
    of more than two axes, flax `DenseGeneral` (the attention projections' layouts).

    Shapes: x (..., *I), kernel (*I, *O), bias (*O) -> y (..., *O), with `in_axes` axes in I
    """

    in_axes = 1

    def __init__(self, in_axes: int = 1):
        self.in_axes = in_axes

    def _check(self, x, kernel, bias):
        n = self.in_axes
        if kernel.ndim <= n or x.ndim < n or x.shape[x.ndim - n :] != kernel.shape[:n]:
            want = "(I, O) with I the input's last axis" if n == 1 else f"(*I, *O) with I {n} axes"
            raise self.shape_error(
                f"input of shape {x.shape} does not fit kernel of shape {kernel.shape}; "
                f"the kernel must be {want}"
            )
        if bias and bias[0].shape != kernel.shape[n:]:
            raise self.shape_error(
                f"bias of shape {bias[0].shape} does not fit kernel of shape {kernel.shape}; "
                f"it must be {kernel.shape[n:]}"
            )

    def forward(self, xp, x, kernel, *bias):
        self._check(x, kernel, bias)
        x, kernel, *bias = as_dtype((x, kernel, *bias), float_dtype(x.dtype, kernel.dtype))
        n, outer = self.in_axes, kernel.shape[self.in_axes :]
        if kernel.ndim != 2:  # (*I, *O) as (I, O): a view of the contiguous parameter
            kernel = kernel.reshape(-1, math.prod(outer))
        self.save(x, kernel)
        rows = bias[0].reshape(-1) if bias else None
        y = kernels.matmul(x.reshape(-1, kernel.shape[0]), kernel, bias=rows)  # (R, O)
        return y.reshape(*x.shape[: x.ndim - n], *outer)

    def backward(self, xp, gy):
        x, kernel = self.saved
        grads = self.grads_from_rows(gy.reshape(-1, kernel.shape[1]), x, kernel)
        return tuple(  # (I, O) and (O,) back in the parameters' own shapes
            g if g is None or g.shape == t.shape else g.reshape(t.shape)
            for g, t in zip(grads, self.inputs)
        )

    def grads_from_rows(self, g_rows, x, kernel) -> tuple:
        """Input, kernel and bias gradients from the gradient of the affine output (R, O)."""
        grads = [None, None]
        if self.needs_grad[0]:
            grads[0] = kernels.matmul(g_rows, kernel.T).reshape(x.shape)  # (..., I)
        if self.needs_grad[1]:
            grads[1] = kernels.matmul(x.reshape(-1, kernel.shape[0]).T, g_rows)  # (I, O)
        if len(self.needs_grad) == 3:
            grads.append(kernels.bias_grad(g_rows) if self.needs_grad[2] else None)  # (O,)
        return tuple(grads)


class DenseGelu(Dense):
    """gelu(x @ kernel + bias): the first layer of an MLP block with its activation, the bias add
    and GELU done in one pass over the GEMM output by the fused kernel (float32).

    Shapes: x (..., I), kernel (I, O), bias (O,) -> y (..., O)
    """

    def __init__(self, approximate: bool = True):
        self.approximate = approximate

    def forward(self, xp, x, kernel, bias):
        self._check(x, kernel, (bias,))
        x, kernel, bias = as_dtype((x, kernel, bias), float_dtype(x.dtype, kernel.dtype))
        h = kernels.matmul(x.reshape(-1, x.shape[-1]), kernel)  # (R, O): bias not yet added
        self.fused = kernels.fusable(h, bias)
        self.save(x, kernel, bias, h)
        if self.fused:
            y = kernels.gelu_forward(h, bias, self.approximate)
        else:
            y = gelu_values(xp, h + bias, self.approximate)
        return y.reshape(*x.shape[:-1], kernel.shape[1])

    def backward(self, xp, gy):
        x, kernel, bias, h = self.saved
        g = gy.reshape(h.shape)
        if self.fused:
            gh = kernels.gelu_backward(g, h, bias, self.approximate)
        else:
            gh = gelu_grad(xp, g, h + bias, self.approximate)
        return self.grads_from_rows(gh, x, kernel)


class HeadsProjections(Function):
    """The query, key and value `DenseGeneral` projections as one GEMM against their kernels
    side by side, the output packed for `PackedAttention` (one product of thrice the width: BLAS
    runs narrow layers faster, and the input gradient is one product instead of three and a sum).

    Shapes: x (..., D), kernels 3 x (D, NH, K), biases 3 x (NH, K) -> y (..., 3, NH, K)
    """

    def forward(self, xp, x, *params):
        heads = params[0].shape
        for p in params[:3]:
            if p.ndim != 3 or p.shape != heads or x.shape[-1] != heads[0]:
                raise self.shape_error(
                    f"input of shape {x.shape} and kernels of shapes "
                    f"{[q.shape for q in params[:3]]} do not fit; each kernel must be (D, NH, K) "
                    "with D the input's last axis"
                )
        for p in params[3:]:
            if p.shape != heads[1:]:
                raise self.shape_error(
                    f"bias of shape {p.shape} does not fit kernels of shape {heads}; "
                    f"it must be {heads[1:]}"
                )
        x, *params = as_dtype((x, *params), float_dtype(x.dtype, params[0].dtype))
        d, width = heads[0], heads[1] * heads[2]
        kernel = xp.empty((d, 3 * width), x.dtype)  # (D, 3 NH K): [query | key | value]
        for i, p in enumerate(params[:3]):
            kernel[:, i * width : (i + 1) * width] = p.reshape(d, width)
        self.save(x, kernel)
        biases = xp.concatenate([b.reshape(-1) for b in params[3:]])  # (3 NH K,)
        y = kernels.matmul(x.reshape(-1, d), kernel, bias=biases)  # (R, 3 NH K)
        return y.reshape(*x.shape[:-1], 3, *heads[1:])

    def backward(self, xp, gy):
        x, kernel = self.saved
        d, width = kernel.shape[0], kernel.shape[1] // 3
        g_rows = gy.reshape(-1, 3 * width)  # (R, 3 NH K)
        needs = self.needs_grad
        grads = [kernels.matmul(g_rows, kernel.T).reshape(x.shape) if needs[0] else None]
        heads = self.inputs[1].shape
        gw = kernels.matmul(x.reshape(-1, d).T, g_rows) if any(needs[1:4]) else None  # (D, 3W)
        for i, needed in enumerate(needs[1:4]):
            part = gw[:, i * width : (i + 1) * width] if needed else None
            grads.append(None if part is None else xp.ascontiguousarray(part).reshape(heads))
        gb = kernels.bias_grad(g_rows) if any(needs[4:]) else None  # (3 NH K,)
        for i, needed in enumerate(needs[4:]):
            grads.append(gb[i * width : (i + 1) * width].reshape(heads[1:]) if needed else None)
        return tuple(grads)


def matmul(a, b) -> Tensor:
    """Matrix product with NumPy semantics, 1-D operands included.

    Shapes: a (..., M, K) or (K,), b (..., K, N) or (K,) -> y (..., M, N), 1-D axes dropped
    """
    a, b = as_tensor(a), as_tensor(b, like=a)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"MatMul: cannot multiply shapes {a.shape} and {b.shape}; use mul")
    a2 = reshape(a, (1, a.shape[0])) if a.ndim == 1 else a  # (1, K)
    b2 = reshape(b, (b.shape[0], 1)) if b.ndim == 1 else b  # (K, 1)
    y = MatMul()(a2, b2)
    if b.ndim == 1:
        y = reshape(y, y.shape[:-1])  # (..., M)
    if a.ndim == 1:
        y = reshape(y, y.shape[:-2] + y.shape[-1:] if b.ndim > 1 else y.shape[:-1])
    return y


def dense_gelu(x, kernel, bias, approximate: bool = True) -> Tensor:
    """gelu(x @ kernel + bias) over the last axis: `dense` then `gelu` as one op.

    Shapes: x (..., I), kernel (I, O), bias (O,) -> y (..., O)
    """
    return DenseGelu(approximate)(x, kernel, bias)


def dense(x, kernel, bias=None, in_axes: int = 1) -> Tensor:
    """x @ kernel + bias over the last axis (flax `nn.Dense`), or over the last `in_axes` axes
    into every further kernel axis (flax `DenseGeneral`: the attention projections).

    Shapes: x (..., I), kernel (I, O), bias (O,) or None -> y (..., O); in general
    x (..., *I), kernel (*I, *O), bias (*O) -> y (..., *O)
    """
    op = Dense(in_axes)
    return op(x, kernel) if bias is None else op(x, kernel, bias)


def heads_projections(x, kernels_, biases) -> Tensor:
    """The query, key and value projections of `x` as one op, packed on axis -3.

    Shapes: x (..., D), kernels_ 3 x (D, NH, K), biases 3 x (NH, K) -> (..., 3, NH, K)
    """
    return HeadsProjections()(x, *kernels_, *biases)
