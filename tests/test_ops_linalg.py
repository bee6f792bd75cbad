"""matmul and dense: values against einsum, gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad

from minivit import Tensor, ops

RNG = np.random.default_rng(1)


def randn(*shape):
    return RNG.standard_normal(shape)


@pytest.mark.parametrize(
    "a_shape, b_shape",
    [
        ((3, 4), (4, 5)),  # plain
        ((2, 3, 4), (4, 1)),  # batch on the left, 2-D right: one GEMM
        ((1, 3, 4), (2, 4, 5)),  # broadcast batch axes
        ((2, 1, 3, 5), (4, 5, 2)),  # size-1 and missing batch axes
        ((4,), (4, 3)),  # 1-D left
        ((2, 3, 4), (4,)),  # 1-D right
        ((5,), (5,)),  # inner product
    ],
)
def test_matmul_grad(a_shape, b_shape):
    a, b = randn(*a_shape), randn(*b_shape)
    y = ops.matmul(a, b)
    np.testing.assert_allclose(y.data, np.matmul(a, b), rtol=1e-12, atol=1e-12)
    check_grad(ops.matmul, a, b)


def test_matmul_grad_non_contiguous():
    a = randn(5, 3).T  # (3, 5), transposed view
    b = randn(5, 8)[:, ::2]  # (5, 4), strided view
    assert not a.flags.c_contiguous and not b.flags.c_contiguous
    check_grad(ops.matmul, a, b)
    check_grad(ops.matmul, randn(2, 5, 3).transpose(0, 2, 1), randn(2, 5, 4))


@pytest.mark.parametrize("x_shape", [(7, 3), (2, 5, 3), (1, 1, 3), (3,)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_grad(x_shape, with_bias):
    x, kernel, bias = randn(*x_shape), randn(3, 4), randn(4)
    expected = np.einsum("...i,io->...o", x, kernel) + (bias if with_bias else 0.0)
    if with_bias:
        np.testing.assert_allclose(ops.dense(x, kernel, bias).data, expected, rtol=1e-12)
        check_grad(ops.dense, x, kernel, bias)
    else:
        np.testing.assert_allclose(ops.dense(x, kernel).data, expected, rtol=1e-12)
        check_grad(ops.dense, x, kernel)


@pytest.mark.parametrize(
    "x_shape, kernel_shape, in_axes",
    [((2, 5, 4), (4, 2, 3), 1), ((2, 5, 2, 3), (2, 3, 4), 2), ((3, 2, 3), (2, 3, 2, 2), 2)],
)
def test_dense_general_axes_values_and_grad(x_shape, kernel_shape, in_axes):
    # flax DenseGeneral: the attention projections (D, NH, K) and (NH, K, D)
    x, kernel, bias = randn(*x_shape), randn(*kernel_shape), randn(*kernel_shape[in_axes:])
    n = len(x_shape) - in_axes
    flat = kernel.reshape(int(np.prod(kernel_shape[:in_axes])), -1)
    rows = x.reshape(*x_shape[:n], -1) @ flat
    expected = rows.reshape(*x_shape[:n], *kernel_shape[in_axes:]) + bias
    got = ops.dense(x, kernel, bias, in_axes=in_axes).data
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    check_grad(lambda *a: ops.dense(*a, in_axes=in_axes), x, kernel, bias)


def test_dense_grad_non_contiguous_and_skips_frozen_inputs():
    x = randn(4, 6, 3).transpose(1, 0, 2)  # (6, 4, 3) transposed
    kernel = randn(5, 3).T  # (3, 5)
    check_grad(ops.dense, x, kernel, randn(5))
    xt, kt = Tensor(randn(2, 3)), Tensor(randn(3, 4), requires_grad=True)
    ops.sum(ops.dense(xt, kt)).backward()
    assert xt.grad is None and kt.grad.shape == (3, 4)


@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("x_shape", [(7, 3), (2, 5, 3)])
def test_dense_gelu_grad(x_shape, approximate):
    x, kernel, bias = randn(*x_shape) * 2, randn(3, 4), randn(4)
    expected = ops.gelu(ops.dense(x, kernel, bias), approximate=approximate).data
    got = ops.dense_gelu(x, kernel, bias, approximate=approximate).data
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    check_grad(lambda *a: ops.dense_gelu(*a, approximate=approximate), x, kernel, bias)


@pytest.mark.parametrize("x_shape", [(2, 5, 4), (3, 4)])
def test_heads_projections_values_and_grad(x_shape):
    x = randn(*x_shape)
    weights = [randn(4, 2, 3) for _ in range(3)]  # (D, NH, K) each, the flax layout
    biases = [randn(2, 3) for _ in range(3)]  # (NH, K) each
    expected = np.stack(
        [np.einsum("...d,dhk->...hk", x, w) + b for w, b in zip(weights, biases)], axis=-3
    )
    got = ops.heads_projections(x, weights, biases).data  # (..., 3, NH, K)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    check_grad(lambda a, *p: ops.heads_projections(a, p[:3], p[3:]), x, *weights, *biases)


def test_heads_projections_gives_each_parameter_its_own_contiguous_gradient():
    params = [Tensor(randn(4, 2, 3), requires_grad=True) for _ in range(3)]
    biases = [Tensor(randn(2, 3), requires_grad=True) for _ in range(3)]
    frozen = Tensor(randn(5, 4))
    ops.sum(ops.mul(ops.heads_projections(frozen, params, biases), randn(5, 3, 2, 3))).backward()
    assert frozen.grad is None
    grads = [t.grad for t in params + biases]
    assert all(g.flags.c_contiguous for g in grads)
    bases = {id(g if g.base is None else g.base) for g in grads}
    assert len(bases) == len(grads)  # no two leaves share memory (clipping scales in place)


def test_shape_errors_name_op_and_shapes():
    with pytest.raises(ValueError, match=r"MatMul.*\(3, 4\).*\(5, 2\)"):
        ops.matmul(randn(3, 4), randn(5, 2))
    with pytest.raises(ValueError, match=r"MatMul.*\(2, 3, 4\).*\(3, 4, 5\)"):
        ops.matmul(randn(2, 3, 4), randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"Dense.*\(2, 3\).*\(4, 5\)"):
        ops.dense(randn(2, 3), randn(4, 5))
    with pytest.raises(ValueError, match=r"Dense.*\(3,\).*\(4, 5\)"):
        ops.dense(randn(2, 4), randn(4, 5), randn(3))
    with pytest.raises(ValueError, match=r"Dense.*\(2, 4, 3\).*\(3, 4, 5\).*\(\*I, \*O\)"):
        ops.dense(randn(2, 4, 3), randn(3, 4, 5), in_axes=2)
    with pytest.raises(ValueError, match=r"Dense.*\(5,\).*\(4, 3, 5\).*\(3, 5\)"):
        ops.dense(randn(2, 4), randn(4, 3, 5), randn(5))
    w, b = [randn(4, 2, 3)] * 3, [randn(2, 3)] * 3
    with pytest.raises(ValueError, match=r"HeadsProjections.*\(2, 5\).*\(D, NH, K\)"):
        ops.heads_projections(randn(2, 5), w, b)
    with pytest.raises(ValueError, match=r"HeadsProjections.*\(3, 2\).*\(2, 3\)"):
        ops.heads_projections(randn(2, 4), w, [randn(3, 2)] * 3)
