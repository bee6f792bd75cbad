"""Mean softmax cross-entropy with integer, one-hot and soft labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_grad

from minivit import Tensor, ops

RNG = np.random.default_rng(7)


def randn(*shape):
    return RNG.standard_normal(shape)


def _loss_loop(logits, labels):
    """-mean_b log(exp(z_b,y) / sum_c exp(z_b,c)) with math.log / math.exp per row."""
    total = 0.0
    for row, label in zip(logits, labels):
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        total += lse - row[label]
    return total / len(labels)


@pytest.mark.parametrize("b, c", [(4, 5), (1, 3), (3, 1), (7, 10)])
def test_integer_and_one_hot_labels(b, c):
    logits, labels = 4.0 * randn(b, c), RNG.integers(0, c, b)
    one_hot = np.eye(c)[labels]
    loss = ops.softmax_cross_entropy(logits, labels)
    assert loss.shape == ()
    np.testing.assert_allclose(loss.data, _loss_loop(logits, labels), rtol=1e-13)
    np.testing.assert_allclose(
        ops.softmax_cross_entropy(logits, one_hot).data, loss.data, rtol=1e-13
    )
    grads = check_grad(ops.softmax_cross_entropy, logits, labels)
    check_grad(lambda z: ops.softmax_cross_entropy(z, one_hot), logits)
    np.testing.assert_allclose(grads[0].sum(axis=1), 0.0, atol=1e-12)  # one-hot rows sum to 1


def test_soft_labels_grad_and_non_contiguous_logits():
    logits = randn(6, 4).T  # (4, 6) transposed
    soft = RNG.dirichlet(np.ones(6), size=4)
    expected = -np.mean(np.sum(soft * (logits - np.log(np.exp(logits).sum(1, keepdims=True))), 1))
    np.testing.assert_allclose(ops.softmax_cross_entropy(logits, soft).data, expected, rtol=1e-13)
    check_grad(ops.softmax_cross_entropy, logits, soft)  # soft labels differentiated too


def test_labels_as_list_and_tensor():
    logits = randn(3, 4)
    loss = ops.softmax_cross_entropy(Tensor(logits), [0, 3, 1]).data
    np.testing.assert_allclose(loss, _loss_loop(logits, [0, 3, 1]), rtol=1e-13)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy.*\(3, 4\).*\(2,\)"):
        ops.softmax_cross_entropy(randn(3, 4), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: labels must lie in \[0, 4\)"):
        ops.softmax_cross_entropy(randn(2, 4), np.array([0, 4]))
    with pytest.raises(ValueError, match="integer class indices"):
        ops.softmax_cross_entropy(randn(2, 4), np.array([0.0, 1.0]))
