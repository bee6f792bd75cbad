"""Dot-product attention in the flax (B, N, NH, K) layout: values against a loop, gradients."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grad

from minivit import Tensor, ops

RNG = np.random.default_rng(6)


def randn(*shape):
    return RNG.standard_normal(shape)


def _attention_loop(q, k, v):
    """One (batch, head, query) at a time: scaled scores, naive softmax over keys, weighted sum."""
    b, nq, nh, d = q.shape
    out = np.zeros(q.shape)
    for i in range(b):
        for h in range(nh):
            for t in range(nq):
                scores = [q[i, t, h] @ k[i, s, h] / np.sqrt(d) for s in range(k.shape[1])]
                e = np.exp(np.array(scores) - max(scores))
                out[i, t, h] = (e / e.sum()) @ v[i, :, h]
    return out


@pytest.mark.parametrize(
    "q_shape, kv_shape",
    [((2, 5, 3, 4), (2, 5, 3, 4)), ((1, 3, 1, 7), (1, 6, 1, 7)), ((2, 1, 2, 1), (2, 4, 2, 1))],
)
def test_attention_values_and_grad(q_shape, kv_shape):
    q, k, v = randn(*q_shape), randn(*kv_shape), randn(*kv_shape)
    np.testing.assert_allclose(
        ops.dot_product_attention(q, k, v).data, _attention_loop(q, k, v), rtol=1e-12, atol=1e-12
    )
    check_grad(ops.dot_product_attention, q, k, v)


def test_attention_grad_non_contiguous():
    qkv = randn(2, 4, 3, 3, 5)  # (B, N, 3, NH, K) like a fused projection
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.flags.c_contiguous
    check_grad(ops.dot_product_attention, q, k, v)


def test_attention_dropout_grad_and_rate_zero():
    q, k, v = randn(2, 4, 2, 3), randn(2, 4, 2, 3), randn(2, 4, 2, 3)
    check_grad(
        lambda a, b, c: ops.dot_product_attention(a, b, c, 0.3, np.random.default_rng(3)), q, k, v
    )
    dropped = ops.dot_product_attention(q, k, v, 0.3, np.random.default_rng(3)).data
    assert not np.allclose(dropped, _attention_loop(q, k, v))
    plain = ops.dot_product_attention(q, k, v, 0.0, np.random.default_rng(3)).data
    np.testing.assert_allclose(plain, _attention_loop(q, k, v), rtol=1e-12)


def _packed(qkv):
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


@pytest.mark.parametrize("shape", [(2, 5, 3, 2, 4), (1, 3, 3, 1, 7)])
def test_packed_attention_values_and_grad(shape):
    qkv = randn(*shape)  # (B, N, 3, NH, K)
    np.testing.assert_allclose(
        ops.packed_attention(qkv).data, _attention_loop(*_packed(qkv)), rtol=1e-12, atol=1e-12
    )
    check_grad(ops.packed_attention, qkv)
    check_grad(lambda a: ops.packed_attention(a, 0.3, np.random.default_rng(5)), randn(*shape))


def test_packed_attention_gradient_is_the_three_gradients_stacked():
    qkv, gy = randn(2, 6, 3, 2, 3), randn(2, 6, 2, 3)
    packed = Tensor(qkv, requires_grad=True)
    ops.packed_attention(packed).backward(gy)
    parts = [Tensor(a, requires_grad=True) for a in _packed(qkv)]
    ops.dot_product_attention(*parts).backward(gy)
    np.testing.assert_allclose(packed.grad, np.stack([t.grad for t in parts], axis=2), rtol=1e-12)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"DotProductAttention.*\(2, 3, 4, 5\).*\(2, 3, 2, 5\)"):
        ops.dot_product_attention(randn(2, 3, 4, 5), randn(2, 3, 2, 5), randn(2, 3, 2, 5))
    with pytest.raises(ValueError, match=r"DotProductAttention.*\(2, 3, 4\)"):
        ops.dot_product_attention(randn(2, 3, 4), randn(2, 3, 4), randn(2, 3, 4))
    with pytest.raises(ValueError, match="needs rng"):
        ops.dot_product_attention(randn(1, 2, 1, 2), randn(1, 2, 1, 2), randn(1, 2, 1, 2), 0.1)
    with pytest.raises(ValueError, match=r"PackedAttention.*\(2, 3, 2, 5\).*\(B, N, 3, NH, K\)"):
        ops.packed_attention(randn(2, 3, 2, 5))
    with pytest.raises(ValueError, match="needs rng"):
        ops.packed_attention(randn(1, 2, 3, 1, 2), 0.1)
