"""Elementwise ops: broadcasting arithmetic, nonlinearities, GELU (both forms), dropout."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_grad

from minivit import Tensor, ops

RNG = np.random.default_rng(2)

BROADCAST_SHAPES = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),  # missing leading axis
    ((2, 1, 3), (1, 4, 1)),  # size-1 axes on both sides
    ((1,), (5,)),
    ((2, 3), ()),  # scalar array
]


def randn(*shape):
    return RNG.standard_normal(shape)


def away_from_zero(*shape):
    """Values with |v| in [0.5, 2]: no kink of relu or pole of div within reach of eps."""
    return RNG.uniform(0.5, 2.0, shape) * RNG.choice([-1.0, 1.0], shape)


@pytest.mark.parametrize("a_shape, b_shape", BROADCAST_SHAPES)
@pytest.mark.parametrize(
    "op, reference",
    [(ops.add, np.add), (ops.sub, np.subtract), (ops.mul, np.multiply), (ops.div, np.divide)],
)
def test_binary_grad(op, reference, a_shape, b_shape):
    a, b = randn(*a_shape), away_from_zero(*b_shape)
    np.testing.assert_allclose(op(a, b).data, reference(a, b), rtol=1e-15)
    check_grad(op, a, b)
    check_grad(op, b, away_from_zero(*a_shape))  # the shapes swapped


def test_binary_grad_non_contiguous_and_python_scalars():
    a = randn(4, 6)[:, ::2]  # (4, 3) strided
    b = randn(3, 4).T  # (4, 3) transposed
    for op in (ops.add, ops.sub, ops.mul):
        check_grad(op, a, b)
    check_grad(lambda x: ops.div(2.0, x), away_from_zero(3, 2))
    check_grad(lambda x: 3.0 - x * 0.5, randn(2, 3))  # Tensor operators


def test_add_gives_two_leaves_separate_gradient_arrays():
    a, b = Tensor(randn(2, 3), requires_grad=True), Tensor(randn(2, 3), requires_grad=True)
    ops.add(a, b).backward(np.ones((2, 3)))
    assert a.grad is not b.grad
    a.grad *= 2.0  # an optimiser scaling one gradient in place leaves the other alone
    np.testing.assert_array_equal(b.grad, np.ones((2, 3)))


def test_add_relu_values_grad_and_separate_leaf_gradients():
    a, b = randn(3, 4, 5), randn(3, 4, 5)
    np.testing.assert_array_equal(ops.add_relu(a, b).data, np.maximum(a + b, 0))
    check_grad(ops.add_relu, a, b)
    ta, tb = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    ops.add_relu(ta, tb).backward(np.ones(a.shape))
    np.testing.assert_array_equal(ta.grad, (a + b > 0).astype(float))
    assert not np.shares_memory(ta.grad, tb.grad)
    with pytest.raises(ValueError, match=r"AddRelu.*\(3, 4, 5\).*\(4, 5\)"):
        ops.add_relu(a, b[0])


@pytest.mark.parametrize("shape", [(7,), (2, 1, 3), (1,)])
@pytest.mark.parametrize(
    "op, reference, make",
    [
        (ops.neg, np.negative, randn),
        (ops.exp, np.exp, randn),
        (ops.log, np.log, lambda *s: RNG.uniform(0.3, 3.0, s)),
        (ops.tanh, np.tanh, randn),
        (ops.relu, lambda v: np.where(v > 0, v, 0.0), away_from_zero),
        (ops.sqrt, np.sqrt, lambda *s: RNG.uniform(0.3, 3.0, s)),
    ],
)
def test_unary_grad(op, reference, make, shape):
    x = make(*shape)
    np.testing.assert_allclose(op(x).data, reference(x), rtol=1e-15)
    check_grad(op, x)
    strided = (np.abs(make(*shape, 2)) + 0.3)[..., ::2]
    assert strided.size == 1 or not strided.flags.c_contiguous
    check_grad(op, strided)


def test_relu_gradient_at_zero_is_zero():
    x = Tensor(np.array([-1.0, 0.0, 2.0]), requires_grad=True)
    ops.sum(ops.relu(x)).backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 1.0])


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (1, 1)])
@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_grad(shape, approximate):
    x = 2.5 * randn(*shape)
    check_grad(lambda v: ops.gelu(v, approximate=approximate), x)


def test_gelu_grad_non_contiguous():
    x = randn(6, 4).T
    check_grad(ops.gelu, x)
    check_grad(lambda v: ops.gelu(v, approximate=False), x)


def test_gelu_values_against_math_module():
    """erf form: x * Phi(x) with Phi from math.erfc; tanh form: the formula of jax.nn.gelu."""
    x = np.concatenate([np.linspace(-6.0, 6.0, 49), 3.0 * randn(20)])
    exact = [v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x]
    tanh_form = [
        0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3))) for v in x
    ]
    np.testing.assert_allclose(ops.gelu(x, approximate=False).data, exact, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ops.gelu(x).data, tanh_form, rtol=1e-14, atol=1e-15)
    x32 = x.astype(np.float32)
    np.testing.assert_allclose(ops.gelu(x32, approximate=False).data, exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ops.gelu(x32).data, tanh_form, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, rate", [((4, 5), 0.3), ((3, 1, 7), 0.5), ((9,), 0.9)])
def test_dropout_grad(shape, rate):
    x = randn(*shape)
    check_grad(lambda v: ops.dropout(v, rate, np.random.default_rng(7)), x)


def test_dropout_values():
    x = np.ones((200, 100))
    y = ops.dropout(x, 0.25, np.random.default_rng(0)).data
    assert set(np.unique(y)) == {0.0, 1.0 / 0.75}
    assert abs((y == 0).mean() - 0.25) < 0.01
    again = ops.dropout(x, 0.25, np.random.default_rng(0)).data
    np.testing.assert_array_equal(y, again)  # a seed fixes the mask
    assert ops.dropout(Tensor(x), 0.0).data is x  # rate 0: the identity, no rng needed
    np.testing.assert_array_equal(ops.dropout(x, 1.0, np.random.default_rng(0)).data, 0.0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"Add.*\(3, 4\).*\(3,\)"):
        ops.add(randn(3, 4), randn(3))
    with pytest.raises(ValueError, match=r"Mul.*\(2, 3\).*\(4, 1, 2\)"):
        ops.mul(randn(2, 3), randn(4, 1, 2))
    with pytest.raises(ValueError, match="dropout: rate must lie in"):
        ops.dropout(randn(3), 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs rng"):
        ops.dropout(randn(3), 0.5)
