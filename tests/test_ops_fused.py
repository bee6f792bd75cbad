"""float32 ops run the fused kernels; they must agree with the plain float64 path of each op.

float64 inputs take the ops' plain array code (the one the gradient checks prove), float32 inputs
take `minivit.kernels`; forward values and every input gradient must match to float32 accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest

from minivit import Tensor, ops


def _run(fn, arrays, gy):
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    y = fn(*tensors)
    y.backward(gy.astype(y.dtype))
    return y.data, [t.grad for t in tensors]


def _agree(fn, arrays, gy_shape, rtol=1e-5, seed=0):
    gy = np.random.default_rng(seed).standard_normal(gy_shape)
    y64, g64 = _run(fn, [a.astype(np.float64) for a in arrays], gy)
    y32, g32 = _run(fn, [a.astype(np.float32) for a in arrays], gy)
    assert y32.dtype == np.float32 and all(g.dtype == np.float32 for g in g32)
    np.testing.assert_allclose(y32, y64, rtol=0, atol=rtol * np.abs(y64).max())
    for a, b in zip(g32, g64):
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 77), (2, 197, 64)])
def test_layer_norm_fused_matches_plain(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 3 + 1
    scale, bias = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    _agree(ops.layer_norm, [x, scale, bias], shape)


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_fused_matches_plain(approximate):
    x = np.random.default_rng(2).standard_normal((4, 9, 33)) * 3
    _agree(lambda t: ops.gelu(t, approximate=approximate), [x], x.shape)


@pytest.mark.parametrize("n,heads,k", [(5, 2, 8), (50, 3, 32), (197, 2, 64)])
def test_attention_fused_matches_plain(n, heads, k):
    rng = np.random.default_rng(3)
    q, kk, v = (rng.standard_normal((2, n, heads, k)) for _ in range(3))
    _agree(ops.dot_product_attention, [q, kk, v], q.shape)


@pytest.mark.parametrize("n,heads,k", [(5, 2, 8), (197, 3, 64)])
def test_packed_attention_fused_matches_plain(n, heads, k):
    qkv = np.random.default_rng(5).standard_normal((2, n, 3, heads, k))
    _agree(ops.packed_attention, [qkv], (2, n, heads, k))


def test_heads_projections_float32_matches_float64():
    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal(s) for s in [(2, 9, 12)] + [(12, 3, 4)] * 3 + [(3, 4)] * 3]
    _agree(lambda x, *p: ops.heads_projections(x, p[:3], p[3:]), arrays, (2, 9, 3, 3, 4))


def test_cross_entropy_fused_matches_plain():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 10)) * 4
    labels = rng.integers(0, 10, 6)
    gy = np.array(1.0)
    y64, (g64,) = _run(lambda t: ops.softmax_cross_entropy(t, labels), [logits], gy)
    y32, (g32,) = _run(
        lambda t: ops.softmax_cross_entropy(t, labels), [logits.astype(np.float32)], gy
    )
    np.testing.assert_allclose(y32, y64, rtol=1e-6)
    np.testing.assert_allclose(g32, g64, atol=1e-7)
    onehot = np.eye(10)[labels]
    y1h, (g1h,) = _run(
        lambda t: ops.softmax_cross_entropy(t, onehot), [logits.astype(np.float32)], gy
    )
    np.testing.assert_allclose(y1h, y64, rtol=1e-6)
    np.testing.assert_allclose(g1h, g64, atol=1e-7)


@pytest.mark.parametrize(
    ("size", "window", "stride", "padding"),
    [(15, 7, 2, "SAME"), (9, 3, 1, "SAME"), (10, 3, 2, "SAME"), (11, 3, 2, "VALID")],
)
def test_conv_im2col_fused_matches_plain(size, window, stride, padding):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, size, size, 3))
    kernel = rng.standard_normal((window, window, 3, 4))
    fn = lambda x, k: ops.conv2d(x, k, stride=stride, padding=padding)  # noqa: E731
    y_shape = ops.conv2d(Tensor(x), Tensor(kernel), stride=stride, padding=padding).shape
    _agree(fn, [x, kernel], y_shape)


@pytest.mark.parametrize("relu", [False, True])
def test_max_pool_fused_matches_plain(relu):
    x = np.random.default_rng(7).standard_normal((2, 11, 10, 5))
    x = np.maximum(x, 0) if relu else x
    y_shape = ops.max_pool(Tensor(x)).shape
    _agree(ops.max_pool, [x], y_shape)


@pytest.mark.parametrize("approximate", [True, False])
def test_dense_gelu_fused_matches_plain(approximate):
    rng = np.random.default_rng(8)
    x, kernel, bias = (
        rng.standard_normal((3, 70, 16)),
        rng.standard_normal((16, 40)) / 4,
        rng.standard_normal(40),
    )
    _agree(lambda *a: ops.dense_gelu(*a, approximate=approximate), [x, kernel, bias], (3, 70, 40))


def test_dense_bias_kernel_matches_plain():
    rng = np.random.default_rng(9)
    x, kernel, bias = (
        rng.standard_normal((600, 20)),
        rng.standard_normal((20, 33)),
        rng.standard_normal(33),
    )
    _agree(ops.dense, [x, kernel, bias], (600, 33))


@pytest.mark.parametrize("relu", [False, True])
def test_group_norm_fused_matches_plain(relu):
    rng = np.random.default_rng(10)
    x, scale, bias = (
        rng.standard_normal((2, 5, 6, 64)),
        rng.standard_normal(64),
        rng.standard_normal(64),
    )
    fn = lambda *a: ops.group_norm(*a, relu=relu)  # noqa: E731
    _agree(fn, [x, scale, bias], x.shape)


def test_add_relu_fused_matches_plain():
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((2, 7, 7, 33)), rng.standard_normal((2, 7, 7, 33))
    _agree(ops.add_relu, [a, b], a.shape)


@pytest.mark.parametrize("shape", [(3, 3, 16, 8), (1, 1, 64, 200), (7, 7, 3, 64)])
def test_weight_standardize_fused_matches_plain(shape):
    rng = np.random.default_rng(8)
    w = rng.standard_normal(shape) * rng.uniform(0.2, 2.0, shape[-1]) + rng.uniform(
        -1, 1, shape[-1]
    )
    _agree(ops.weight_standardize, [w], shape, rtol=2e-5)
