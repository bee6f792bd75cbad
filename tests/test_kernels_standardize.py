"""StdConv weight standardisation: the Numba CPU bodies against the float64 NumPy spec, and the
spec's backward against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from minivit import kernels
from minivit.kernels import standardize

pytestmark = pytest.mark.usefixtures("each_cpu_body")  # threaded and serial bodies


@pytest.fixture(autouse=True, params=[16, 512])
def columns(request, monkeypatch):
    """Blocks of 16 output channels (many tasks, a partial last block) and the default."""
    monkeypatch.setattr(standardize, "COLUMNS", request.param)
    return request.param


def _kernel(rng, p, o, spread=1.0):
    """A (P, O) kernel whose channels have different means and spreads; one is constant."""
    w = rng.standard_normal((p, o)) * spread * rng.uniform(0.1, 3.0, o) + rng.uniform(-2, 2, o)
    w[:, o // 2] = 0.25  # a constant channel: std 0
    return w.astype(np.float32)


@pytest.mark.parametrize("p, o", [(27, 64), (576, 130), (9, 1), (2304, 256)])
def test_forward_matches_the_spec(p, o):
    w = _kernel(np.random.default_rng(p + o), p, o)
    got = kernels.standardize_forward(w, body="cpu")
    want = kernels.standardize_forward_ref(w)
    for g, x in zip(got, want):
        assert g.dtype == np.float32 and g.shape == x.shape
        np.testing.assert_allclose(g, x, rtol=2e-6, atol=2e-6 * max(1.0, float(np.abs(x).max())))
    y = got[0].astype(np.float64)
    live = np.arange(o) != o // 2
    np.testing.assert_allclose(y[:, live].mean(0), 0, atol=1e-5)
    std = w.astype(np.float64).std(0)[live]
    np.testing.assert_allclose(y[:, live].std(0), std / (std + 1e-5), rtol=1e-5)
    np.testing.assert_array_equal(y[:, o // 2], 0)


@pytest.mark.parametrize("p, o", [(27, 64), (576, 130), (9, 1)])
def test_backward_matches_the_spec(p, o):
    rng = np.random.default_rng(p * o)
    w = _kernel(rng, p, o)
    gy = rng.standard_normal((p, o)).astype(np.float32)
    _, mean, std = kernels.standardize_forward_ref(w)
    got = kernels.standardize_backward(gy, w, mean, std, body="cpu")
    want = kernels.standardize_backward_ref(gy, w, mean, std)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)


def test_spec_backward_matches_finite_differences():
    """The float64 spec against central differences of sum(gy * forward(w))."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((12, 5)) * rng.uniform(0.5, 2.0, 5) + rng.uniform(-1, 1, 5)
    gy = rng.standard_normal((12, 5))
    eps = 1e-5

    def loss(w64):
        centred = w64 - w64.mean(0)
        return float((gy * centred / (np.sqrt((centred**2).mean(0)) + eps)).sum())

    mean, std = w.mean(0), w.std(0)
    grad = standardize.standardize_backward_ref(gy, w, mean, std, eps).astype(np.float64)
    h, numeric = 1e-6, np.empty_like(w)
    for idx in np.ndindex(*w.shape):
        up, down = w.copy(), w.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (loss(up) - loss(down)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)  # spec returns float32


def test_bad_shapes_get_one_sentence():
    with pytest.raises(ValueError, match="w must be 2-D"):
        kernels.standardize_forward(np.ones((3, 3, 4), np.float32), body="cpu")
