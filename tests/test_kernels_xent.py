"""Softmax cross-entropy kernels: reference vs log-softmax formula, CPU body vs reference."""

from __future__ import annotations

import numpy as np
import pytest

from minivit.kernels import (
    softmax_xent_backward,
    softmax_xent_backward_ref,
    softmax_xent_forward,
    softmax_xent_forward_ref,
)

pytestmark = pytest.mark.usefixtures("each_cpu_body")  # threaded and serial bodies


def assert_matches(got, ref, rtol=1e-5):
    """Agreement to `rtol` relative to the reference's largest magnitude, element by element."""
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


def _inputs(rows, classes, seed=0, soft=False):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, classes)) * 4.0).astype(np.float32)
    if soft:
        labels = rng.random((rows, classes)).astype(np.float32)
    else:
        labels = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, rows)]
    return logits, labels, rng.standard_normal(rows).astype(np.float32)


def _loss(z, y):
    """-sum_c y_c log softmax(z)_c per row, with the softmax written out (float64)."""
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(y * np.log(p)).sum(-1)


def test_reference_matches_written_out_softmax():
    z, y, _ = _inputs(6, 10)
    loss, lse = softmax_xent_forward_ref(z, y)
    z64 = z.astype(np.float64)
    assert_matches(loss, _loss(z64, y), rtol=1e-6)
    assert_matches(lse, np.log(np.exp(z64).sum(-1)), rtol=1e-6)


@pytest.mark.parametrize("soft", [False, True])
def test_reference_backward_matches_finite_differences(soft):
    z, y, g = (a.astype(np.float64) for a in _inputs(4, 7, seed=1, soft=soft))
    _, lse = softmax_xent_forward_ref(z, y)
    direction = np.random.default_rng(3).standard_normal(z.shape)

    def along(t):
        return np.vdot(g, _loss(z + t * direction, y))

    numeric = (along(1e-6) - along(-1e-6)) / 2e-6
    analytic = np.vdot(softmax_xent_backward_ref(g, z, y, lse).astype(np.float64), direction)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


@pytest.mark.parametrize(
    "rows, classes, soft", [(1, 10, False), (37, 1000, False), (256, 100, True), (5, 77, True)]
)
def test_cpu_forward_and_backward_match_reference(rows, classes, soft):
    z, y, g = _inputs(rows, classes, seed=rows, soft=soft)
    got = softmax_xent_forward(z, y, body="cpu")
    ref = softmax_xent_forward_ref(z, y)
    for a, b in zip(got, ref):
        assert a.dtype == np.float32
        assert_matches(a, b)
    assert_matches(
        softmax_xent_backward(g, z, y, ref[1], body="cpu"),
        softmax_xent_backward_ref(g, z, y, ref[1]),
    )


def test_rejects_labels_of_another_shape():
    with pytest.raises(ValueError, match="one-hot or soft labels"):
        softmax_xent_forward(np.zeros((2, 5), np.float32), np.zeros((2, 4), np.float32))
