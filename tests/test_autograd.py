"""The autograd core: accumulation, no_grad, freeing the graph, bad backward calls."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from gradcheck import check_grad

from minivit import Tensor, no_grad, ops
from minivit.autograd import Function

RNG = np.random.default_rng(9)


def test_tensor_used_twice_accumulates():
    x = Tensor(RNG.standard_normal((2, 3)), requires_grad=True)
    y = ops.sum(x * x + ops.exp(x))  # x feeds three uses
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + np.exp(x.data), rtol=1e-14)


def test_gradients_accumulate_across_backward_calls():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    ops.sum(3.0 * x).backward()
    ops.sum(x * x).backward()
    np.testing.assert_allclose(x.grad, [3.0 + 2.0, 3.0 + 4.0])


def test_diamond_graph():
    """h feeds two branches that join again: backward sums both paths exactly once."""
    x = Tensor(RNG.standard_normal(4), requires_grad=True)
    h = ops.tanh(x)
    ops.sum(ops.mul(h, ops.exp(h))).backward()
    t = np.tanh(x.data)
    np.testing.assert_allclose(x.grad, (np.exp(t) + t * np.exp(t)) * (1 - t**2), rtol=1e-14)


def test_no_grad_records_nothing():
    x = Tensor(RNG.standard_normal((2, 3)), requires_grad=True)
    with no_grad():
        y = ops.layer_norm(x, np.ones(3), np.zeros(3))
        z = ops.sum(y * 2.0)
    for t in (y, z):
        assert t.creator is None and not t.requires_grad
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        z.backward()
    assert ops.exp(x).creator is not None  # recording resumes after the block


def test_graph_is_freed_after_backward():
    x = Tensor(RNG.standard_normal((3, 4)), requires_grad=True)
    y = ops.layer_norm(x, Tensor(np.ones(4), requires_grad=True), np.zeros(4))
    saved = weakref.ref(y.creator.saved[1])  # the row means: only the graph holds them
    loss = ops.sum(ops.tanh(y))
    gc.collect()
    assert saved() is not None
    loss.backward()
    gc.collect()
    assert loss.creator is None and y.creator is None
    assert saved() is None


def test_backward_on_non_scalar_needs_a_gradient():
    x = Tensor(RNG.standard_normal((2, 3)), requires_grad=True)
    with pytest.raises(ValueError, match=r"one element.*\(2, 3\)"):
        ops.exp(x).backward()
    y = ops.exp(x)
    y.backward(np.ones((2, 3)))  # with an explicit gradient it works
    np.testing.assert_allclose(x.grad, np.exp(x.data), rtol=1e-15)


class _WrongSquare(Function):
    """x^2 with the gradient 2.001 x: check_grad must reject it."""

    def forward(self, xp, x):
        self.save(x)
        return x * x

    def backward(self, xp, gy):
        (x,) = self.saved
        return gy * 2.001 * x


def test_check_grad_rejects_a_wrong_backward():
    check_grad(lambda x: x * x, RNG.standard_normal((3, 2)))
    with pytest.raises(AssertionError):
        check_grad(lambda x: _WrongSquare()(x), RNG.standard_normal((3, 2)))
    with pytest.raises(AssertionError):  # too big for the element-wise pass: the direction alone
        check_grad(lambda x: _WrongSquare()(x), RNG.standard_normal((300,)), elementwise=0)


def test_leaf_gradients_never_share_memory():
    """Two leaves that receive the same upstream array get separate buffers (in-place safe)."""
    a = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    b = Tensor(np.ones((6,), np.float32), requires_grad=True)
    y = ops.reshape(a, (6,)) * 1.0 + b  # Add may hand gy to both inputs
    (y * y).sum().backward()
    assert not np.shares_memory(a.grad, b.grad)
    a.grad *= 0
    np.testing.assert_array_equal(b.grad, np.full(6, 4.0, np.float32))
