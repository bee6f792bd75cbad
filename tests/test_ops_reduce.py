"""Reductions (sum, mean, max) and the softmax family: values, gradients, ties, bad axes."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad

from minivit import Tensor, ops

RNG = np.random.default_rng(3)

AXES = [None, 0, -1, (0, 2), (1,), (-3, -1)]


def randn(*shape):
    return RNG.standard_normal(shape)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize(
    "op, reference", [(ops.sum, np.sum), (ops.mean, np.mean), (ops.max, np.max)]
)
def test_reduction_grad(op, reference, axis, keepdims):
    x = randn(3, 1, 5)
    y = op(x, axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(y.data, reference(x, axis=axis, keepdims=keepdims), rtol=1e-14)
    check_grad(lambda v: op(v, axis=axis, keepdims=keepdims), x)


@pytest.mark.parametrize("op", [ops.sum, ops.mean, ops.max])
def test_reduction_grad_non_contiguous(op):
    x = randn(4, 7, 3).transpose(2, 0, 1)[:, ::2]  # (3, 2, 7) transposed and strided
    check_grad(lambda v: op(v, axis=(0, 2)), x)
    check_grad(lambda v: op(v, axis=1, keepdims=True), x)


def test_max_ties_split_the_gradient_evenly():
    x = Tensor(np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]]), requires_grad=True)
    ops.max(x, axis=1).backward(np.array([6.0, 1.0]))
    np.testing.assert_allclose(x.grad, [[0.0, 3.0, 3.0, 0.0], [0.25, 0.25, 0.25, 0.25]])


def _naive_softmax(row):
    e = [np.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("shape, axis", [((4, 5), -1), ((3, 1, 6), 0), ((2, 3, 7), 1), ((5,), 0)])
@pytest.mark.parametrize("op", [ops.softmax, ops.log_softmax])
def test_softmax_family_grad(op, shape, axis):
    x = 3.0 * randn(*shape)
    check_grad(lambda v: op(v, axis=axis), x)
    check_grad(lambda v: op(v, axis=axis), randn(*shape[::-1]).T)  # F-ordered


def test_softmax_values_against_a_loop():
    x = 10.0 * randn(4, 6)
    naive = np.array([_naive_softmax(list(row)) for row in x])
    np.testing.assert_allclose(ops.softmax(x).data, naive, rtol=1e-13)
    np.testing.assert_allclose(ops.log_softmax(x).data, np.log(naive), rtol=1e-12)
    np.testing.assert_allclose(ops.softmax(x.T, axis=0).data, naive.T, rtol=1e-13)
    big = np.array([[1000.0, 0.0, -1000.0]])  # no overflow
    np.testing.assert_allclose(ops.log_softmax(big).data, [[0.0, -1000.0, -2000.0]])


def test_bad_axes():
    with pytest.raises(ValueError, match=r"Sum: axis 3 is out of range.*\(2, 3\)"):
        ops.sum(randn(2, 3), axis=3)
    with pytest.raises(ValueError, match=r"Mean: axis \(1, -1\) repeats"):
        ops.mean(randn(2, 3), axis=(1, -1))
    with pytest.raises(ValueError, match=r"Softmax: axis 2 is out of range"):
        ops.softmax(randn(2, 3), axis=2)
