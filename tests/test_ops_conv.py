"""conv2d (every GEMM plan), max_pool and global_avg_pool against direct loops; gradients."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad

from minivit import Tensor, ops
from minivit.ops.conv import Conv2D, same_padding

RNG = np.random.default_rng(8)


def randn(*shape):
    return RNG.standard_normal(shape)


def _pads(hw, window, stride, padding):
    """TF padding, written out per axis: SAME pads to ceil(n/s) outputs, the extra pixel after."""
    if padding == "VALID":
        return [(0, 0), (0, 0)]
    pads = []
    for n, k, s in zip(hw, window, stride):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _windows(x, window, stride, padding, fill):
    """Yield (i, j, patch) over output positions, patch (B, kh, kw, C) cut from the padded x."""
    pads = _pads(x.shape[1:3], window, stride, padding)
    padded = np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=fill)
    (kh, kw), (sh, sw) = window, stride
    for i in range((padded.shape[1] - kh) // sh + 1):
        for j in range((padded.shape[2] - kw) // sw + 1):
            yield i, j, padded[:, i * sh : i * sh + kh, j * sw : j * sw + kw]


def _conv_loop(x, kernel, stride, padding):
    cells = list(_windows(x, kernel.shape[:2], stride, padding, 0.0))
    y = np.zeros((x.shape[0], cells[-1][0] + 1, cells[-1][1] + 1, kernel.shape[3]))
    for i, j, patch in cells:
        y[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel)
    return y


def _pool_loop(x, window, stride, padding):
    cells = list(_windows(x, window, stride, padding, -np.inf))
    y = np.zeros((x.shape[0], cells[-1][0] + 1, cells[-1][1] + 1, x.shape[3]))
    for i, j, patch in cells:
        y[:, i, j] = patch.max(axis=(1, 2))
    return y


CONV_CASES = [  # x shape, kernel shape, stride, padding, GEMM plan
    ((2, 5, 5, 3), (1, 1, 3, 4), 1, "SAME", "pointwise"),
    ((2, 5, 6, 3), (1, 1, 3, 2), 2, "VALID", "pointwise"),
    ((1, 7, 5, 2), (1, 1, 2, 3), 2, "SAME", "pointwise"),
    ((2, 8, 8, 3), (4, 4, 3, 5), 4, "VALID", "patches"),
    ((2, 7, 8, 2), (3, 3, 2, 4), 3, "VALID", "patches"),  # the last row/column is cropped
    ((1, 6, 4, 3), (2, 2, 3, 2), 2, "SAME", "patches"),  # divisible: SAME pads nothing
    ((2, 5, 5, 2), (2, 2, 2, 3), 2, "SAME", "im2col"),  # pads (0, 1)
    ((2, 5, 6, 2), (3, 3, 2, 3), 1, "SAME", "im2col"),
    ((2, 6, 6, 2), (3, 3, 2, 3), 2, "SAME", "im2col"),  # even n: pads (0, 1)
    ((1, 7, 6, 2), (3, 3, 2, 2), 2, "VALID", "im2col"),
    ((1, 9, 9, 2), (7, 7, 2, 3), 2, "SAME", "im2col"),  # the ResNet root, odd size
    ((2, 5, 7, 1), (2, 3, 1, 2), (1, 2), "SAME", "im2col"),  # rectangular kernel and stride
]


@pytest.mark.parametrize("x_shape, k_shape, stride, padding, plan", CONV_CASES)
def test_conv2d_values_and_grad(x_shape, k_shape, stride, padding, plan):
    x, kernel, bias = randn(*x_shape), randn(*k_shape), randn(k_shape[3])
    strides = (stride, stride) if isinstance(stride, int) else stride
    op = Conv2D(stride, padding)
    y = op(x, kernel, bias)
    assert op.plan.kind == plan
    expected = _conv_loop(x, kernel, strides, padding) + bias
    np.testing.assert_allclose(y.data, expected, rtol=1e-12, atol=1e-12)
    check_grad(lambda a, w, b: ops.conv2d(a, w, b, stride, padding), x, kernel, bias)
    check_grad(lambda a, w: ops.conv2d(a, w, stride=stride, padding=padding), x, kernel)


@pytest.mark.parametrize(
    "k_shape, stride", [((1, 1, 2, 3), 1), ((2, 2, 2, 3), 2), ((3, 3, 2, 3), 2)]
)
def test_conv2d_grad_non_contiguous_and_elementwise(k_shape, stride):
    x = randn(2, 3, 4, 4).transpose(0, 2, 3, 1)  # (2, 4, 4, 3) NCHW storage seen as NHWC
    kernel = randn(*k_shape[::-1]).T  # HWIO view of an OIHW array
    check_grad(lambda a, w: ops.conv2d(a, w, stride=stride), x[..., :2], kernel)
    check_grad(lambda a, w: ops.conv2d(a, w, stride=stride), randn(1, 3, 3, 2), kernel)


def test_same_padding_matches_the_readme_examples():
    assert same_padding(32, 7, 2) == (2, 3) and same_padding(224, 7, 2) == (2, 3)
    assert same_padding(56, 3, 2) == (0, 1) and same_padding(14, 3, 1) == (1, 1)
    assert same_padding(5, 1, 2) == (0, 0)


@pytest.mark.parametrize(
    "x_shape, window, stride, padding",
    [
        ((2, 8, 8, 3), 3, 2, "SAME"),
        ((1, 7, 7, 2), 3, 2, "SAME"),
        ((2, 5, 6, 1), 2, 2, "VALID"),
        ((1, 4, 5, 2), 3, 1, "SAME"),
        ((1, 6, 5, 2), (2, 3), (1, 2), "VALID"),
    ],
)
def test_max_pool_values_and_grad(x_shape, window, stride, padding):
    x = randn(*x_shape)
    window2, stride2 = ((v, v) if isinstance(v, int) else v for v in (window, stride))
    expected = _pool_loop(x, window2, stride2, padding)
    np.testing.assert_array_equal(ops.max_pool(x, window, stride, padding).data, expected)
    check_grad(lambda a: ops.max_pool(a, window, stride, padding), x)
    check_grad(lambda a: ops.max_pool(a, window, stride, padding), randn(*x_shape[::-1]).T)


def test_max_pool_ties_send_the_gradient_to_the_first_maximum():
    x = Tensor(np.array([[1.0, 2.0], [2.0, 2.0]]).reshape(1, 2, 2, 1), requires_grad=True)
    ops.max_pool(x, 2, 2, "VALID").backward(np.full((1, 1, 1, 1), 5.0))
    np.testing.assert_array_equal(x.grad.reshape(2, 2), [[0.0, 5.0], [0.0, 0.0]])


@pytest.mark.parametrize("x_shape", [(2, 3, 4, 5), (1, 1, 1, 3)])
def test_global_avg_pool_grad(x_shape):
    x = randn(*x_shape)
    np.testing.assert_allclose(ops.global_avg_pool(x).data, x.mean(axis=(1, 2)), rtol=1e-14)
    check_grad(ops.global_avg_pool, x)
    check_grad(ops.global_avg_pool, randn(*x_shape[::-1]).T)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"Conv2D.*\(1, 4, 4, 3\).*\(3, 3, 2, 5\)"):
        ops.conv2d(randn(1, 4, 4, 3), randn(3, 3, 2, 5))
    with pytest.raises(ValueError, match=r"Conv2D: padding must be one of"):
        ops.conv2d(randn(1, 4, 4, 3), randn(3, 3, 3, 5), padding="same ")
    with pytest.raises(ValueError, match=r"Conv2D: a \(5, 5\) window does not fit"):
        ops.conv2d(randn(1, 4, 4, 3), randn(5, 5, 3, 5), padding="VALID")
    with pytest.raises(ValueError, match=r"Conv2D: stride must be a positive int"):
        ops.conv2d(randn(1, 4, 4, 3), randn(3, 3, 3, 5), stride=0)
    with pytest.raises(ValueError, match=r"MaxPool.*\(4, 4, 3\)"):
        ops.max_pool(randn(4, 4, 3))
    with pytest.raises(ValueError, match=r"global_avg_pool.*\(4, 3\)"):
        ops.global_avg_pool(randn(4, 3))
