"""The fused GroupNorm against its reference, and the reference against an independent loop."""

from __future__ import annotations

import numpy as np
import pytest

from minivit.kernels import groupnorm

SHAPES = [(1, 1, 64, 32), (2, 9, 64, 32), (3, 49, 96, 32), (2, 16, 256, 8)]  # (B, S, C, G)


def _inputs(b, s, c, seed=0, offset=0.5):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, s, c)) * 2 + offset).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    gy = rng.standard_normal((b, s, c)).astype(np.float32)
    return x, scale, bias, gy


def _close(a, b, rtol=1e-5):
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("offset", [0.5, 300.0])  # 300: groups far from zero mean
@pytest.mark.parametrize("b,s,c,g", SHAPES)
def test_cpu_body_matches_reference(b, s, c, g, offset):
    x, scale, bias, gy = _inputs(b, s, c, offset=offset)
    ref = groupnorm.groupnorm_forward(x, scale, bias, g, body="ref")
    cpu = groupnorm.groupnorm_forward(x, scale, bias, g, body="cpu")
    for got, want in zip(cpu, ref):
        _close(got, want)
    grads_ref = groupnorm.groupnorm_backward(gy, x, ref[1], ref[2], scale, g, body="ref")
    grads_cpu = groupnorm.groupnorm_backward(gy, x, cpu[1], cpu[2], scale, g, body="cpu")
    # gx = rstd * (gy*scale - two group means): its terms are of size rstd*|gy*scale|, which is
    # the scale float32 rounding works on (tiny groups cancel almost exactly)
    term = (np.abs(gy * scale).reshape(b, s, g, -1) * ref[2][:, None, :, None]).max()
    np.testing.assert_allclose(grads_cpu[0], grads_ref[0], rtol=0, atol=1e-5 * term)
    for got, want in zip(grads_cpu[1:], grads_ref[1:]):
        _close(got, want)


def test_reference_matches_a_loop_over_samples_and_groups():
    b, s, c, g = 2, 5, 64, 32
    x, scale, bias, _ = _inputs(b, s, c, seed=1)
    y, mean, rstd = groupnorm.groupnorm_forward_ref(x, scale, bias, g)
    cg = c // g
    for n in range(b):
        for k in range(g):
            block = x[n, :, k * cg : (k + 1) * cg].astype(np.float64)
            mu, var = block.mean(), block.var()  # two-pass variance, independent of the spec
            want = (block - mu) / np.sqrt(var + 1e-6) * scale[k * cg : (k + 1) * cg]
            want += bias[k * cg : (k + 1) * cg]
            np.testing.assert_allclose(y[n, :, k * cg : (k + 1) * cg], want, rtol=1e-5, atol=1e-5)
            assert mean[n, k] == pytest.approx(mu, rel=1e-6)
            assert rstd[n, k] == pytest.approx(1 / np.sqrt(var + 1e-6), rel=1e-5)


def test_reference_backward_matches_finite_differences():
    b, s, c, g = 1, 3, 32, 32 // 4
    x, scale, bias, gy = (a.astype(np.float64) for a in _inputs(b, s, c, seed=2))
    _, mean, rstd = groupnorm.groupnorm_forward_ref(x, scale, bias, g)
    gx, gscale, gbias = groupnorm.groupnorm_backward_ref(
        gy, x, mean.astype(np.float64), rstd.astype(np.float64), scale, g
    )
    rng = np.random.default_rng(3)
    dirs = [rng.standard_normal(a.shape) for a in (x, scale, bias)]

    def along(t):
        y = groupnorm.groupnorm_forward_ref(
            *(a + t * d for a, d in zip((x, scale, bias), dirs)), g
        )[0]
        return np.vdot(gy, y)

    numeric = (along(1e-6) - along(-1e-6)) / 2e-6
    analytic = sum(np.vdot(gr, d) for gr, d in zip((gx, gscale, gbias), dirs))
    assert analytic == pytest.approx(numeric, rel=1e-4)


@pytest.mark.parametrize("b,s,c,g", SHAPES[1:3])
def test_fused_relu_matches_relu_after_groupnorm(b, s, c, g):
    # offset 0: about half the outputs are negative, so the mask matters everywhere
    x, scale, bias, gy = _inputs(b, s, c, seed=3, offset=0.0)
    plain = groupnorm.groupnorm_forward_ref(x, scale, bias, g)
    want_y = np.maximum(plain[0], 0)
    for body in ("ref", "cpu"):
        y, mean, rstd = groupnorm.groupnorm_forward(x, scale, bias, g, relu=True, body=body)
        _close(y, want_y)
        assert (y >= 0).all() and 0.3 < (y > 0).mean() < 0.7
        got = groupnorm.groupnorm_backward(gy, x, mean, rstd, scale, g, relu_out=y, body=body)
        # the chain rule by hand: the ReLU's gradient first, then the plain GroupNorm backward
        want = groupnorm.groupnorm_backward_ref(gy * (y > 0), x, mean, rstd, scale, g)
        term = (np.abs(gy * scale).reshape(b, s, g, -1) * rstd[:, None, :, None]).max()
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5 * term)
        for a, w in zip(got[1:], want[1:]):
            _close(a, w)
