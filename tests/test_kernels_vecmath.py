"""The scalar float32 helpers of the Numba bodies: exp32 and the ordered int keys of floats."""

from __future__ import annotations

import numba
import numpy as np

from minivit.kernels._vecmath import exp32, from_ordered_bits, ordered_bits


@numba.njit(cache=False)
def _keys_and_back(x):
    keys = np.empty(x.size, np.int32)
    back = np.empty_like(x)
    for i in range(x.size):
        keys[i] = ordered_bits(x[i])
        back[i] = from_ordered_bits(keys[i])
    return keys, back


@numba.njit(cache=False)
def _max_by_keys(x):
    key = ordered_bits(x[0])
    for i in range(1, x.size):
        key = max(key, ordered_bits(x[i]))
    return from_ordered_bits(key)


@numba.njit(cache=False)
def _exp_all(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = exp32(x[i])
    return out


def test_keys_sort_like_the_floats_and_invert_exactly():
    x = np.array(
        [-np.inf, -3e38, -1.5, -1e-45, -0.0, 0.0, 1e-45, 2.0, 3e38, np.inf], dtype=np.float32
    )
    keys, back = _keys_and_back(x)
    assert np.all(np.diff(keys) > 0)  # strictly increasing, -0.0 below +0.0
    np.testing.assert_array_equal(back.view(np.int32), x.view(np.int32))  # bit-exact


def test_max_through_keys_is_the_float_max():
    rng = np.random.default_rng(0)
    for scale, shift in [(1.0, 0.0), (30.0, -100.0), (1e-30, 0.0), (5.0, 50.0)]:
        x = (rng.standard_normal(197) * scale + shift).astype(np.float32)
        assert _max_by_keys(x) == x.max()


def test_exp32_relative_error():
    x = np.linspace(-87, 88, 100_001, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(_exp_all(x), want, rtol=2e-7)
