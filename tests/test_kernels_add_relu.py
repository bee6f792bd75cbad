"""relu(a + b) kernels: the Numba CPU body against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from minivit import kernels

pytestmark = pytest.mark.usefixtures("each_cpu_body")  # threaded and serial bodies


def test_cpu_body_equals_reference_bit_for_bit():
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((4, 9, 9, 40)).astype(np.float32) for _ in range(2))
    a_strided = np.asfortranarray(a)  # any layout in, C order out
    y = kernels.add_relu_forward(a_strided, b, body="cpu")
    np.testing.assert_array_equal(y, kernels.add_relu_forward_ref(a, b))
    np.testing.assert_array_equal(y, np.maximum(a + b, 0))
    gy = rng.standard_normal(y.shape).astype(np.float32)
    g = kernels.add_relu_backward(gy, y, body="cpu")
    np.testing.assert_array_equal(g, kernels.add_relu_backward_ref(gy, y))
    np.testing.assert_array_equal(g, np.where(a + b > 0, gy, 0))
