"""LayerNorm kernels: the reference against independent formulas, every CPU body against it."""

from __future__ import annotations

import numpy as np
import pytest

from minivit.kernels import (
    layernorm_backward,
    layernorm_backward_ref,
    layernorm_forward,
    layernorm_forward_ref,
)

pytestmark = pytest.mark.usefixtures("each_cpu_body")  # threaded and serial bodies

SHAPES = [(1, 768), (1, 5), (37, 77), (197, 768), (64, 384), (3, 1000)]  # (R, D)


def assert_matches(got, ref, rtol=1e-5):
    """Agreement to `rtol` relative to the reference's largest magnitude, element by element."""
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


def _inputs(shape, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(np.float32)
    scale = (1.0 + 0.1 * rng.standard_normal(shape[1])).astype(np.float32)
    bias = rng.standard_normal(shape[1]).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    return x, scale, bias, gy


def _two_pass(x, scale, bias, eps=1e-6):
    """LayerNorm with np.var (the two-pass variance), float64."""
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def test_reference_forward_matches_two_pass_variance():
    x, scale, bias, _ = _inputs((9, 33))
    y, mean, rstd = layernorm_forward_ref(x, scale, bias)
    x64 = x.astype(np.float64)
    assert_matches(y, _two_pass(x64, scale, bias), rtol=1e-6)
    assert_matches(mean, x64.mean(-1), rtol=1e-6)
    assert_matches(rstd, 1.0 / np.sqrt(x64.var(-1) + 1e-6), rtol=1e-6)


def test_reference_backward_matches_finite_differences():
    x, scale, bias, gy = (a.astype(np.float64) for a in _inputs((4, 13), seed=1))
    _, mean, rstd = layernorm_forward_ref(x, scale, bias)
    grads = layernorm_backward_ref(gy, x, mean.astype(np.float64), rstd, scale)
    rng = np.random.default_rng(2)
    dirs = [rng.standard_normal(a.shape) for a in (x, scale, bias)]

    def along(t):
        shifted = [a + t * d for a, d in zip((x, scale, bias), dirs)]
        return np.vdot(gy, _two_pass(*shifted))

    numeric = (along(1e-6) - along(-1e-6)) / 2e-6
    analytic = sum(np.vdot(g.astype(np.float64), d) for g, d in zip(grads, dirs))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_forward_and_backward_match_reference(shape):
    x, scale, bias, gy = _inputs(shape, seed=shape[0] + shape[1])
    got = layernorm_forward(x, scale, bias, body="cpu")
    ref = layernorm_forward_ref(x, scale, bias)
    for g, r in zip(got, ref):
        assert g.dtype == np.float32
        assert_matches(g, r)
    grads = layernorm_backward(gy, x, ref[1], ref[2], scale, body="cpu")
    for g, r in zip(grads, layernorm_backward_ref(gy, x, ref[1], ref[2], scale)):
        assert g.dtype == np.float32
        assert_matches(g, r)


def test_cpu_keeps_precision_when_the_mean_dwarfs_the_spread():
    x, scale, bias, _ = _inputs((8, 768), offset=300.0)  # fast variance cancels 4 digits here
    for g, r in zip(
        layernorm_forward(x, scale, bias, body="cpu"), layernorm_forward_ref(x, scale, bias)
    ):
        assert_matches(g, r)


def test_cpu_accepts_strided_float64_input():
    x, scale, bias, _ = _inputs((12, 40))
    wide = np.repeat(x.astype(np.float64), 2, axis=1)[:, ::2]  # non-contiguous float64 view of x
    y, _, _ = layernorm_forward(wide, scale, bias, body="cpu")
    assert y.dtype == np.float32
    assert_matches(y, layernorm_forward_ref(x, scale, bias)[0])


def test_rejects_a_3d_input_with_a_reshape_hint():
    with pytest.raises(ValueError, match="reshape it to"):
        layernorm_forward(np.zeros((2, 3, 4), np.float32), np.ones(4), np.zeros(4))
