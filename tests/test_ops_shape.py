"""Shape ops: reshape, transpose, concat, index, pad, broadcast_to."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad

from minivit import Tensor, ops

RNG = np.random.default_rng(4)


def randn(*shape):
    return RNG.standard_normal(shape)


@pytest.mark.parametrize(
    "x_shape, shape", [((2, 3, 4), (6, 4)), ((2, 3, 4), (-1,)), ((5,), (1, 5, 1)), ((1,), ())]
)
def test_reshape_grad(x_shape, shape):
    x = randn(*x_shape)
    np.testing.assert_array_equal(ops.reshape(x, shape).data, x.reshape(shape))
    check_grad(lambda v: ops.reshape(v, shape), x)
    check_grad(lambda v: v.reshape(*shape), x)  # Tensor method


def test_reshape_grad_non_contiguous():
    check_grad(lambda v: ops.reshape(v, (3, 4)), randn(4, 3).T)


@pytest.mark.parametrize("axes", [None, (1, 0, 2), (2, 0, 1), (-1, 0, 1)])
def test_transpose_grad(axes):
    x = randn(2, 3, 4)
    np.testing.assert_array_equal(ops.transpose(x, axes).data, np.transpose(x, axes))
    check_grad(lambda v: ops.transpose(v, axes), x)
    check_grad(lambda v: ops.transpose(v, axes), randn(4, 3, 2).T)


@pytest.mark.parametrize(
    "shapes, axis",
    [
        ([(2, 3), (4, 3), (1, 3)], 0),
        ([(2, 1, 3), (2, 4, 3)], 1),
        ([(2, 3), (2, 5)], -1),
        ([(3,)], 0),
    ],
)
def test_concat_grad(shapes, axis):
    xs = [randn(*s) for s in shapes]
    np.testing.assert_array_equal(ops.concat(xs, axis).data, np.concatenate(xs, axis))
    check_grad(lambda *vs: ops.concat(vs, axis), *xs)


def test_concat_grad_non_contiguous_and_constant_inputs():
    check_grad(lambda a, b: ops.concat([a, b], 1), randn(3, 2).T, randn(2, 6)[:, ::3])
    a = Tensor(randn(2, 3), requires_grad=True)
    ops.sum(ops.concat([Tensor(randn(1, 3)), a], 0)).backward()
    np.testing.assert_array_equal(a.grad, np.ones((2, 3)))


@pytest.mark.parametrize(
    "idx",
    [
        (slice(None), 0),  # the cls token: x[:, 0]
        (slice(1, None), slice(None, None, -2)),  # negative step
        (Ellipsis, None, 1),
        -1,
        np.array([2, 0, 2, 2]),  # repeated gather: gradients accumulate
        (np.array([0, 1]), slice(None), np.array([3, 3])),
        np.array([True, False, True]),  # boolean mask
    ],
)
def test_index_grad(idx):
    x = randn(3, 2, 4)
    np.testing.assert_array_equal(ops.index(x, idx).data, x[idx])
    check_grad(lambda v: ops.index(v, idx), x)
    check_grad(lambda v: v[idx], randn(4, 2, 3).T)  # Tensor indexing, F-ordered input


def test_index_repeated_gather_accumulates():
    x = Tensor(np.zeros(3), requires_grad=True)
    ops.sum(x[np.array([1, 1, 2, 1])]).backward()
    np.testing.assert_array_equal(x.grad, [0.0, 3.0, 1.0])


@pytest.mark.parametrize(
    "pad_width, value",
    [(((0, 0), (2, 3), (0, 1)), 0.0), (1, -np.inf), (((1, 0),), 2.5)],
)
def test_pad_grad(pad_width, value):
    x = randn(2, 3, 2)
    expected = np.pad(x, pad_width, constant_values=value)
    np.testing.assert_array_equal(ops.pad(x, pad_width, value).data, expected)
    if np.isfinite(value):
        check_grad(lambda v: ops.pad(v, pad_width, value), x)
    check_grad(lambda v: ops.exp(ops.max(ops.pad(v, pad_width, value), axis=1)), randn(2, 3, 2))


@pytest.mark.parametrize(
    "x_shape, shape", [((3,), (2, 3)), ((2, 1), (2, 5)), ((1, 1, 4), (3, 2, 4))]
)
def test_broadcast_to_grad(x_shape, shape):
    x = randn(*x_shape)
    np.testing.assert_array_equal(ops.broadcast_to(x, shape).data, np.broadcast_to(x, shape))
    check_grad(lambda v: ops.broadcast_to(v, shape), x)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"Reshape.*\(2, 3\).*\(4, 2\)"):
        ops.reshape(randn(2, 3), (4, 2))
    with pytest.raises(ValueError, match=r"Transpose.*\(0, 0\).*\(2, 3\)"):
        ops.transpose(randn(2, 3), (0, 0))
    with pytest.raises(ValueError, match=r"Concat.*\(2, 3\).*\(2, 4\)"):
        ops.concat([randn(2, 3), randn(2, 4)], 0)
    with pytest.raises(ValueError, match=r"BroadcastTo.*\(3,\).*\(2, 4\)"):
        ops.broadcast_to(randn(3), (2, 4))
    with pytest.raises(ValueError, match=r"Pad.*\(2, 3\)"):
        ops.pad(randn(2, 3), ((1, 1), (1, 1), (1, 1)))
    with pytest.raises(IndexError, match=r"Index.*\(2, 3\)"):
        ops.index(randn(2, 3), (0, 5))
