"""GELU kernels (tanh and erf forms, fused bias): reference vs formulas, CPU body vs reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minivit.kernels import gelu_backward, gelu_backward_ref, gelu_forward, gelu_forward_ref

pytestmark = pytest.mark.usefixtures("each_cpu_body")  # threaded and serial bodies

SHAPES = [(1, 1), (1, 3072), (37, 77), (197, 768), (64, 1536)]  # (R, M)


def assert_matches(got, ref, rtol=1e-5):
    """Agreement to `rtol` relative to the reference's largest magnitude, element by element."""
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


def _gelu_math(z, approximate):
    """Element by element with the math module, float64."""
    if approximate:
        inner = math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)
        return 0.5 * z * (1.0 + math.tanh(inner))
    return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3.0).astype(np.float32)  # reaches both saturated tails
    bias = rng.standard_normal(shape[1]).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    return x, bias, gy


@pytest.mark.parametrize("approximate", [True, False])
def test_reference_forward_matches_math_module(approximate):
    x, bias, _ = _inputs((5, 11))
    z = x.astype(np.float64) + bias
    expected = np.vectorize(lambda v: _gelu_math(v, approximate))(z)
    assert_matches(gelu_forward_ref(x, bias, approximate), expected, rtol=1e-6)


def test_reference_erf_form_hits_normal_cdf_table_values():
    # x Phi(x) with Phi(1) = 0.8413447461, Phi(-1) = 0.1586552539, Phi(2) = 0.9772498681
    y = gelu_forward_ref(np.array([[1.0, -1.0, 2.0]], np.float32), approximate=False)
    np.testing.assert_allclose(y[0], [0.8413447461, -0.1586552539, 1.9544997361], rtol=1e-6)


@pytest.mark.parametrize("approximate", [True, False])
def test_reference_backward_matches_finite_differences(approximate):
    x, bias, gy = _inputs((3, 17), seed=1)
    z = x.astype(np.float64) + bias
    f = np.vectorize(lambda v: _gelu_math(v, approximate))
    numeric = gy * (f(z + 1e-6) - f(z - 1e-6)) / 2e-6
    assert_matches(gelu_backward_ref(gy, x, bias, approximate), numeric, rtol=1e-6)


@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_forward_and_backward_match_reference(shape, approximate):
    x, bias, gy = _inputs(shape, seed=shape[1])
    y = gelu_forward(x, bias, approximate, body="cpu")
    assert y.dtype == np.float32
    assert_matches(y, gelu_forward_ref(x, bias, approximate))
    gx = gelu_backward(gy, x, bias, approximate, body="cpu")
    assert gx.dtype == np.float32
    assert_matches(gx, gelu_backward_ref(gy, x, bias, approximate))


@pytest.mark.parametrize("approximate", [True, False])
def test_cpu_without_bias_and_far_into_the_tails(approximate):
    x = np.linspace(-40.0, 40.0, 801, dtype=np.float32)[None, :]
    assert_matches(
        gelu_forward(x, None, approximate, body="cpu"), gelu_forward_ref(x, None, approximate)
    )
    gy = np.ones_like(x)
    assert_matches(
        gelu_backward(gy, x, None, approximate, body="cpu"),
        gelu_backward_ref(gy, x, None, approximate),
    )


def test_rejects_a_bias_of_the_wrong_width():
    with pytest.raises(ValueError, match="pass a bias of shape"):
        gelu_forward(np.zeros((2, 4), np.float32), np.zeros(5, np.float32), body="cpu")
