"""Window-sweep kernels (im2col, col2im, max pooling): Numba CPU bodies against the array-code
references, the references against their definitions (adjoint identity, brute-force windows)."""

from __future__ import annotations

import numpy as np
import pytest

from minivit import kernels
from minivit.kernels import window as W
from minivit.ops.conv import MaxPool, _geometry, same_padding

# (H, W, C, window, stride, padding): the ResNet root (7x7/2 on 3 channels) and 3x3/1, 3x3/2
# units, odd sizes where 'SAME' pads asymmetrically, VALID with leftover pixels, 1x1 and
# non-square windows.
GEOMETRIES = [
    (20, 20, 3, (7, 7), (2, 2), "SAME"),
    (9, 9, 5, (3, 3), (1, 1), "SAME"),
    (10, 10, 4, (3, 3), (2, 2), "SAME"),
    (11, 7, 2, (3, 3), (2, 2), "SAME"),
    (12, 13, 3, (3, 3), (2, 2), "VALID"),
    (8, 9, 2, (2, 3), (3, 2), "SAME"),
    (6, 6, 3, (1, 1), (2, 2), "SAME"),
    (5, 5, 2, (5, 5), (1, 1), "VALID"),
]


def _plan(h, w, window, stride, padding):
    return _geometry(MaxPool(), (h, w), window, stride, padding)


def _image(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_im2col_cpu_equals_reference(geom):
    h, w, c, window, stride, padding = geom
    pads, out_hw = _plan(h, w, window, stride, padding)
    x = _image((2, h, w, c))
    got = kernels.im2col(x, window, stride, pads, out_hw, body="cpu")
    ref = W.im2col_ref(x, window, stride, pads, out_hw)
    assert got.shape == ref.shape == (2 * out_hw[0] * out_hw[1], window[0] * window[1] * c)
    np.testing.assert_array_equal(got, ref)  # pure copies: bit for bit


def test_im2col_reference_reads_the_defined_pixels():
    # column (i, j, c) of row (b, oh, ow) is x[b, oh*s + i - top, ow*s + j - left, c], else 0
    h, w, c, window, stride = 11, 7, 2, (3, 3), (2, 2)
    pads, out_hw = _plan(h, w, window, stride, "SAME")
    x = _image((1, h, w, c))
    cols = W.im2col_ref(x, window, stride, pads, out_hw).reshape(*out_hw, *window, c)
    (top, _), (left, _) = pads
    assert pads == (same_padding(h, 3, 2), same_padding(w, 3, 2))
    for oh in range(out_hw[0]):
        for ow in range(out_hw[1]):
            for i in range(3):
                for j in range(3):
                    y, xx = oh * 2 + i - top, ow * 2 + j - left
                    inside = 0 <= y < h and 0 <= xx < w
                    want = x[0, y, xx] if inside else np.zeros(c, np.float32)
                    np.testing.assert_array_equal(cols[oh, ow, i, j], want)


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_col2im_is_the_adjoint_of_im2col(geom):
    # <im2col(x), g> == <x, col2im(g)> for every x, g: checked in float64 on the reference, and
    # the CPU body equals the reference
    h, w, c, window, stride, padding = geom
    pads, out_hw = _plan(h, w, window, stride, padding)
    x = _image((2, h, w, c), seed=1, dtype=np.float64)
    g = _image((2 * out_hw[0] * out_hw[1], window[0] * window[1] * c), seed=2, dtype=np.float64)
    lhs = np.vdot(W.im2col_ref(x, window, stride, pads, out_hw), g)
    rhs = np.vdot(x, W.col2im_ref(g, x.shape, window, stride, pads, out_hw))
    assert lhs == pytest.approx(rhs, rel=1e-12)
    g32 = g.astype(np.float32)
    got = kernels.col2im(g32, x.shape, window, stride, pads, out_hw, body="cpu")
    ref = W.col2im_ref(g32, x.shape, window, stride, pads, out_hw)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("relu", [False, True])  # after a ReLU, ties (zeros) are everywhere
def test_max_pool_cpu_equals_reference(geom, relu):
    h, w, c, window, stride, padding = geom
    pads, out_hw = _plan(h, w, window, stride, padding)
    x = _image((2, h, w, c), seed=3)
    if relu:
        x = np.maximum(x, 0)
    y, arg = kernels.max_pool_forward(x, window, stride, pads, out_hw, body="cpu")
    y_ref, arg_ref = W.max_pool_forward_ref(x, window, stride, pads, out_hw)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)  # the same (first) winner on ties
    gy = _image(y.shape, seed=4)
    gx = kernels.max_pool_backward(gy, arg, x.shape, window, stride, pads, body="cpu")
    gx_ref = W.max_pool_backward_ref(gy, arg_ref, x.shape, window, stride, pads)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_reference_against_brute_force_windows():
    h, w, c = 10, 9, 3
    pads, out_hw = _plan(h, w, (3, 3), (2, 2), "SAME")
    x = _image((1, h, w, c), seed=5)
    y, arg = W.max_pool_forward_ref(x, (3, 3), (2, 2), pads, out_hw)
    (top, _), (left, _) = pads
    for oh in range(out_hw[0]):
        for ow in range(out_hw[1]):
            for ch in range(c):
                taps = [
                    (x[0, oh * 2 + i - top, ow * 2 + j - left, ch], i * 3 + j)
                    for i in range(3)
                    for j in range(3)
                    if 0 <= oh * 2 + i - top < h and 0 <= ow * 2 + j - left < w
                ]
                best = max(v for v, _ in taps)
                assert y[0, oh, ow, ch] == best
                assert arg[0, oh, ow, ch] == next(t for v, t in taps if v == best)
