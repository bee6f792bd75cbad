"""Convolution and pooling over NHWC images with HWIO kernels, TensorFlow 'SAME'/'VALID' padding.

'SAME' pads asymmetrically as TF/XLA do: total = max((ceil(n/s) - 1) * s + k - n, 0),
before = total // 2, after = the rest (7x7/2 on 224 pads (2, 3); 3x3/2 on even n pads (0, 1)).
A convolution is one GEMM on a column matrix: a 1x1 kernel reads the (strided) pixels directly,
a kernel equal to its stride without padding (patch embedding) reshapes the image into patches,
and every other kernel builds the columns by im2col (`kernels.window`: a Numba body for float32
NumPy arrays, kh * kw strided copies otherwise).
"""

from __future__ import annotations

import math

from minivit import kernels
from minivit.autograd import Function, Tensor
from minivit.kernels import window
from minivit.ops.elementwise import as_dtype, float_dtype
from minivit.ops.reduce import mean

PADDINGS = ("SAME", "VALID")


def _pair(value, name: str, op: Function) -> tuple[int, int]:
    """An int or a pair of positive ints as a pair."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise op.shape_error(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' (before, after) padding of one spatial axis of size n, kernel k, stride s."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _geometry(op, hw, window, stride, padding):
    """Padding ((top, bottom), (left, right)) and output size (OH, OW) of one window sweep."""
    if padding not in PADDINGS:
        raise op.shape_error(f"padding must be one of {PADDINGS}, got {padding!r}")
    if padding == "SAME":
        pads = tuple(same_padding(n, k, s) for n, k, s in zip(hw, window, stride))
        return pads, tuple(math.ceil(n / s) for n, s in zip(hw, stride))
    if any(n < k for n, k in zip(hw, window)):
        raise op.shape_error(f"a {window} window does not fit a VALID input of size {hw}")
    return ((0, 0), (0, 0)), tuple((n - k) // s + 1 for n, k, s in zip(hw, window, stride))


class _Columns:
    """The column matrix of a window sweep and its adjoint (scatter back to the image).

    Shapes: x (B, H, W, C) -> columns (B * OH * OW, kh * kw * C), column order (i, j, c) as the
    rows of an HWIO kernel reshaped to (kh * kw * C, O).
    """

    def __init__(self, x_shape, window, stride, pads, out_hw):
        self.x_shape, self.window, self.stride = x_shape, window, stride
        self.pads, self.out_hw = pads, out_hw
        unpadded = pads == ((0, 0), (0, 0))
        if window == (1, 1):
            self.kind = "pointwise"  # a plain GEMM on the (strided) pixels
        elif window == stride and unpadded:
            self.kind = "patches"  # non-overlapping patches: a reshape, no duplication
        else:
            self.kind = "im2col"

    def columns(self, xp, x):
        b, _, _, c = x.shape
        (kh, kw), (sh, sw), (oh, ow) = self.window, self.stride, self.out_hw
        if self.kind == "pointwise":
            return x[:, ::sh, ::sw].reshape(-1, c)  # (B*OH*OW, C)
        if self.kind == "patches":
            grid = x[:, : oh * kh, : ow * kw].reshape(b, oh, kh, ow, kw, c)  # (B,OH,kh,OW,kw,C)
            return grid.transpose(0, 1, 3, 2, 4, 5).reshape(b * oh * ow, kh * kw * c)
        sweep = kernels.im2col if kernels.fusable(x) else window.im2col_ref
        return sweep(x, self.window, self.stride, self.pads, self.out_hw)

    def scatter(self, xp, gcols):
        """The adjoint of `columns`: gradients of the columns summed back onto the image."""
        b, h, w, c = self.x_shape
        (kh, kw), (sh, sw), (oh, ow) = self.window, self.stride, self.out_hw
        if self.kind == "pointwise" and (sh, sw) == (1, 1):
            return gcols.reshape(self.x_shape)
        if self.kind == "im2col":
            adjoint = kernels.col2im if kernels.fusable(gcols) else window.col2im_ref
            return adjoint(gcols, self.x_shape, self.window, self.stride, self.pads, self.out_hw)
        gx = xp.zeros(self.x_shape, dtype=gcols.dtype)
        if self.kind == "pointwise":
            gx[:, ::sh, ::sw] = gcols.reshape(b, oh, ow, c)
            return gx
        g6 = gcols.reshape(b, oh, ow, kh, kw, c).transpose(0, 1, 3, 2, 4, 5)  # (B,OH,kh,OW,kw,C)
        gx[:, : oh * kh, : ow * kw] = g6.reshape(b, oh * kh, ow * kw, c)
        return gx


class Conv2D(Function):
    """2-D convolution (cross-correlation, as flax `nn.Conv`), NHWC input and HWIO kernel.

    Shapes: x (B, H, W, I), kernel (kh, kw, I, O), bias (O,) -> y (B, OH, OW, O)
    """

    def __init__(self, stride=1, padding: str = "SAME"):
        self.stride = _pair(stride, "stride", self)
        self.padding = padding

    def _check(self, x, kernel, bias):
        if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
            raise self.shape_error(
                f"input {x.shape} and kernel {kernel.shape} must be (B, H, W, I) and "
                "(kh, kw, I, O) with the same I"
            )
        if bias and bias[0].shape != kernel.shape[3:]:
            raise self.shape_error(
                f"bias of shape {bias[0].shape} does not fit kernel of shape {kernel.shape}"
            )

    def forward(self, xp, x, kernel, *bias):
        self._check(x, kernel, bias)
        x, kernel, *bias = as_dtype((x, kernel, *bias), float_dtype(x.dtype, kernel.dtype))
        window = kernel.shape[:2]
        pads, out_hw = _geometry(self, x.shape[1:3], window, self.stride, self.padding)
        self.plan = _Columns(x.shape, window, self.stride, pads, out_hw)
        self.save(x, kernel)
        columns = self.plan.columns(xp, x)  # (B*OH*OW, kh*kw*I)
        kernel_2d = kernel.reshape(-1, kernel.shape[3])  # (kh*kw*I, O)
        y = kernels.matmul(columns, kernel_2d, bias=bias[0] if bias else None)  # (B*OH*OW, O)
        return y.reshape(x.shape[0], *out_hw, kernel.shape[3])

    def backward(self, xp, gy):
        x, kernel = self.saved
        gy_rows = gy.reshape(-1, kernel.shape[3])  # (B*OH*OW, O)
        grads = [None, None]
        if self.needs_grad[0]:
            gcols = kernels.matmul(gy_rows, kernel.reshape(-1, kernel.shape[3]).T)  # (R, kh*kw*I)
            grads[0] = self.plan.scatter(xp, gcols)
        if self.needs_grad[1]:
            gk = kernels.matmul(self.plan.columns(xp, x).T, gy_rows)  # (kh*kw*I, O)
            grads[1] = gk.reshape(kernel.shape)
        if len(self.needs_grad) == 3:
            grads.append(kernels.bias_grad(gy_rows) if self.needs_grad[2] else None)
        return tuple(grads)


class MaxPool(Function):
    """Max pooling over (H, W); 'SAME' pads with -inf (flax `nn.max_pool`).

    The gradient of each window goes to one element, the first maximum in row-major window order
    (one winner per window, like XLA's select-and-scatter; which tie wins is our choice, and
    after a ReLU, where ties occur, the winner's gradient is zeroed anyway).

    Shapes: x (B, H, W, C) -> y (B, OH, OW, C)
    """

    def __init__(self, window=3, stride=2, padding: str = "SAME"):
        self.window = _pair(window, "window", self)
        self.stride = _pair(stride, "stride", self)
        self.padding = padding

    def forward(self, xp, x):
        if x.ndim != 4:
            raise self.shape_error(f"input of shape {x.shape} must be (B, H, W, C)")
        pads, out_hw = _geometry(self, x.shape[1:3], self.window, self.stride, self.padding)
        self.pads, self.fused = pads, kernels.fusable(x)
        sweep = kernels.max_pool_forward if self.fused else window.max_pool_forward_ref
        y, arg = sweep(x, self.window, self.stride, pads, out_hw)  # arg: the winning tap
        self.save(arg)
        return y

    def backward(self, xp, gy):
        (arg,) = self.saved
        adjoint = kernels.max_pool_backward if self.fused else window.max_pool_backward_ref
        return adjoint(gy, arg, self.inputs[0].shape, self.window, self.stride, self.pads)


def conv2d(x, kernel, bias=None, stride=1, padding: str = "SAME") -> Tensor:
    """2-D convolution, NHWC and HWIO, TF 'SAME' (asymmetric) or 'VALID' padding.

    Shapes: x (B, H, W, I), kernel (kh, kw, I, O), bias (O,) or None -> (B, OH, OW, O)
    """
    op = Conv2D(stride, padding)
    return op(x, kernel) if bias is None else op(x, kernel, bias)


def max_pool(x, window=3, stride=2, padding: str = "SAME") -> Tensor:
    """Max pooling, -inf padding for 'SAME'. Shapes: x (B, H, W, C) -> (B, OH, OW, C)"""
    return MaxPool(window, stride, padding)(x)


def global_avg_pool(x) -> Tensor:
    """Mean over the spatial axes. Shapes: x (B, H, W, C) -> (B, C)"""
    if len(x.shape) != 4:
        raise ValueError(f"global_avg_pool: input of shape {x.shape} must be (B, H, W, C)")
    return mean(x, axis=(1, 2))
