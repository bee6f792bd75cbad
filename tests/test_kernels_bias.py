"""Bias add: the Numba CPU body against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from minivit import kernels

pytestmark = pytest.mark.usefixtures("each_cpu_body")  # threaded and serial bodies


def test_add_bias_cpu_adds_every_row_in_place():
    rng = np.random.default_rng(0)
    y, b = (
        rng.standard_normal((300, 9)).astype(np.float32),
        rng.standard_normal(9).astype(np.float32),
    )
    want = y + b
    out = kernels.add_bias(y, b, body="cpu")
    assert out is y
    np.testing.assert_array_equal(y, want)  # one float32 add per element: bit for bit


def test_add_bias_strided_output_takes_the_array_code():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((20, 12)).astype(np.float32)
    y, b = base[:, ::2], rng.standard_normal(6).astype(np.float32)  # not C-contiguous
    want = y + b
    kernels.add_bias(y, b, body="cpu")
    np.testing.assert_array_equal(y, want)


def test_add_bias_needs_rows():
    with pytest.raises(ValueError, match="add_bias: y must be 2-D"):
        kernels.add_bias(np.zeros((2, 3, 4), np.float32), np.zeros(4, np.float32), body="cpu")
