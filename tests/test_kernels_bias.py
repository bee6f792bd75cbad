"""The bias gradient: the Numba CPU body against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from minivit import kernels
from minivit.kernels import bias

pytestmark = pytest.mark.usefixtures("each_cpu_body")  # threaded and serial bodies


@pytest.mark.parametrize("rows", [1, 127, 128, 300, 1031])
def test_bias_grad_cpu_sums_every_row(rows):
    rng = np.random.default_rng(rows)
    g = (rng.standard_normal((rows, 37)) + 3.0).astype(np.float32)  # sums far from zero
    want = g.astype(np.float64).sum(axis=0)
    got = kernels.bias_grad(g, body="cpu")
    assert got.dtype == np.float32 and got.shape == (37,)
    # a float32 sum of n positive terms is within (n - 1) 2^-24 of the total, n <= BLOCK_ROWS
    np.testing.assert_allclose(got, want, rtol=bias.BLOCK_ROWS * 2.0**-24)


def test_bias_grad_cpu_rounds_no_worse_than_numpy():
    rng = np.random.default_rng(3)
    g = rng.uniform(0.0, 1.0, (20000, 16)).astype(np.float32)
    want = g.astype(np.float64).sum(axis=0)
    ours = np.abs(kernels.bias_grad(g, body="cpu") - want).max()
    assert ours <= np.abs(g.sum(axis=0) - want).max()


def test_bias_grad_reads_strided_rows_and_keeps_other_dtypes():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((300, 24)).astype(np.float32)
    g = base[::2, ::3]  # neither axis contiguous
    np.testing.assert_allclose(kernels.bias_grad(g, body="cpu"), g.sum(axis=0), rtol=1e-5)
    g64 = base.astype(np.float64)
    out = kernels.bias_grad(g64, body="cpu")
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, g64.sum(axis=0))


def test_bias_grad_needs_rows():
    with pytest.raises(ValueError, match="bias_grad: g must be 2-D"):
        kernels.bias_grad(np.zeros((2, 3, 4), np.float32), body="cpu")
