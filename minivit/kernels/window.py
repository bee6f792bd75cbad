"""Window sweeps over NHWC images: im2col, its adjoint col2im, and max pooling.

A window sweep reads, for every output pixel (oh, ow) and kernel tap (i, j), the input pixel
(oh * sh + i - top, ow * sw + j - left) of the image padded by `pads = ((top, bottom), (left,
right))`. `im2col` lays those reads out as a column matrix (B * OH * OW, kh * kw * C), rows in
(b, oh, ow) order and columns in (i, j, c) order, the rows of an HWIO kernel reshaped to
(kh * kw * C, O); `col2im` sums a column matrix back onto the image (the adjoint, the input
gradient of a convolution). Max pooling keeps, per window and channel, the largest value and
which tap held it (the first in row-major order on ties; padding never wins), and its backward
sends each output gradient to that tap.

Bodies: `*_ref` is plain array code (NumPy or CuPy: the spec, and what CuPy arrays run); the
Numba CPU bodies give each task one output row (forward) or one input row (the adjoints, which
gather instead of scatter, so no two threads write the same pixel). The NumPy im2col makes kh * kw
strided copies of C floats at a time, which is slow for the 3-channel 7x7 root conv (about
200 ms per batch of 32 at 224 px on 2 cores).
"""

from __future__ import annotations

import numba
import numpy as np

from minivit import backend
from minivit.kernels import _dispatch


def _tap(stride, out_hw, i: int, j: int) -> tuple:
    """The slice of the padded image that kernel tap (i, j) reads."""
    (sh, sw), (oh, ow) = stride, out_hw
    return slice(None), slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw)


def _padded_shape(x_shape, pads) -> tuple:
    b, h, w, c = x_shape
    (pt, pb), (pl, pr) = pads
    return b, h + pt + pb, w + pl + pr, c


def im2col_ref(x, window, stride, pads, out_hw):
    """The spec: kh * kw strided copies. Shapes: x (B, H, W, C) -> (B*OH*OW, kh*kw*C)"""
    xp = backend.xp_of(x)
    b, _, _, c = x.shape
    (kh, kw), (oh, ow) = window, out_hw
    padded = xp.pad(x, ((0, 0), *pads, (0, 0))) if pads != ((0, 0), (0, 0)) else x
    cols = xp.empty((b, oh, ow, kh, kw, c), dtype=x.dtype)  # (B, OH, OW, kh, kw, C)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j] = padded[_tap(stride, out_hw, i, j)]
    return cols.reshape(b * oh * ow, kh * kw * c)


def col2im_ref(gcols, x_shape, window, stride, pads, out_hw):
    """The spec of the adjoint: strided adds into a padded image, then the crop.

    Shapes: gcols (B*OH*OW, kh*kw*C) -> (B, H, W, C)
    """
    xp = backend.xp_of(gcols)
    b, h, w, c = x_shape
    (kh, kw), (oh, ow) = window, out_hw
    (pt, _), (pl, _) = pads
    g6 = gcols.reshape(b, oh, ow, kh, kw, c)
    gpad = xp.zeros(_padded_shape(x_shape, pads), dtype=gcols.dtype)
    for i in range(kh):
        for j in range(kw):
            gpad[_tap(stride, out_hw, i, j)] += g6[:, :, :, i, j]
    return gpad[:, pt : pt + h, pl : pl + w]


def max_pool_forward_ref(x, window, stride, pads, out_hw):
    """The spec: -inf padding, running maximum over taps, strict `>` so the first max wins.

    Shapes: x (B, H, W, C) -> y (B, OH, OW, C), arg (B, OH, OW, C) int16 tap index i * kw + j
    """
    xp = backend.xp_of(x)
    kh, kw = window
    padded = xp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-xp.inf)
    y = padded[_tap(stride, out_hw, 0, 0)].copy()  # (B, OH, OW, C)
    arg = xp.zeros(y.shape, dtype=xp.int16)
    for t in range(1, kh * kw):
        tap = padded[_tap(stride, out_hw, t // kw, t % kw)]
        arg[tap > y] = t
        xp.maximum(y, tap, out=y)
    return y, arg


def max_pool_backward_ref(gy, arg, x_shape, window, stride, pads):
    """The spec of the backward: each output gradient added to its winning tap's pixel.

    Shapes: gy, arg (B, OH, OW, C) -> gx (B, H, W, C)
    """
    xp = backend.xp_of(gy)
    _, h, w, _ = x_shape
    (pt, _), (pl, _) = pads
    kh, kw = window
    out_hw = gy.shape[1:3]
    gpad = xp.zeros(_padded_shape(x_shape, pads), dtype=gy.dtype)
    for t in range(kh * kw):
        gpad[_tap(stride, out_hw, t // kw, t % kw)] += xp.where(arg == t, gy, 0)
    return gpad[:, pt : pt + h, pl : pl + w]


@numba.njit(parallel=True, cache=True)
def _im2col_cpu(x, kh, kw, sh, sw, pt, pl, cols):
    b_size, h, w, c = x.shape
    oh, ow = cols.shape[1], cols.shape[2]
    for t in numba.prange(b_size * oh):  # one output row per task
        b, i = t // oh, t % oh
        for j in range(ow):
            for di in range(kh):
                y = i * sh + di - pt
                for dj in range(kw):
                    xx = j * sw + dj - pl
                    if 0 <= y < h and 0 <= xx < w:
                        for ch in range(c):
                            cols[b, i, j, di, dj, ch] = x[b, y, xx, ch]
                    else:
                        for ch in range(c):
                            cols[b, i, j, di, dj, ch] = 0.0


@numba.njit(inline="always", cache=True)
def _sources(pos, pad, k, s, out_n):
    """Taps d of one axis that read input position pos, as (first d, last d, step s): those with
    (pos + pad - d) divisible by s and output index (pos + pad - d) // s in [0, out_n)."""
    first = (pos + pad) % s
    lo = max(first, pos + pad - (out_n - 1) * s)  # output index <= out_n - 1
    lo = first + -(-(lo - first) // s) * s  # round up to the residue class
    hi = min(k - 1, pos + pad)  # output index >= 0
    return lo, hi


@numba.njit(parallel=True, cache=True)
def _col2im_cpu(g6, kh, kw, sh, sw, pt, pl, gx):
    b_size, h, w, c = gx.shape
    oh, ow = g6.shape[1], g6.shape[2]
    for t in numba.prange(b_size * h):  # one input row per task: a gather, no write races
        b, y = t // h, t % h
        di_lo, di_hi = _sources(y, pt, kh, sh, oh)
        for xx in range(w):
            dj_lo, dj_hi = _sources(xx, pl, kw, sw, ow)
            for ch in range(c):
                gx[b, y, xx, ch] = 0.0
            for di in range(di_lo, di_hi + 1, sh):
                i = (y + pt - di) // sh
                for dj in range(dj_lo, dj_hi + 1, sw):
                    j = (xx + pl - dj) // sw
                    for ch in range(c):
                        gx[b, y, xx, ch] += g6[b, i, j, di, dj, ch]


@numba.njit(parallel=True, cache=True)
def _max_pool_forward_cpu(x, kh, kw, sh, sw, pt, pl, y_out, arg):
    b_size, h, w, c = x.shape
    oh, ow = y_out.shape[1], y_out.shape[2]
    for t in numba.prange(b_size * oh):
        b, i = t // oh, t % oh
        for j in range(ow):
            for ch in range(c):
                y_out[b, i, j, ch] = -np.inf
                arg[b, i, j, ch] = 0
            for di in range(kh):
                y = i * sh + di - pt
                if y < 0 or y >= h:
                    continue
                for dj in range(kw):
                    xx = j * sw + dj - pl
                    if xx < 0 or xx >= w:
                        continue
                    for ch in range(c):
                        v = x[b, y, xx, ch]
                        if v > y_out[b, i, j, ch]:
                            y_out[b, i, j, ch] = v
                            arg[b, i, j, ch] = di * kw + dj


@numba.njit(parallel=True, cache=True)
def _max_pool_backward_cpu(gy, arg, kh, kw, sh, sw, pt, pl, gx):
    b_size, h, w, c = gx.shape
    oh, ow = gy.shape[1], gy.shape[2]
    for t in numba.prange(b_size * h):  # gather per input row, like col2im
        b, y = t // h, t % h
        di_lo, di_hi = _sources(y, pt, kh, sh, oh)
        for xx in range(w):
            dj_lo, dj_hi = _sources(xx, pl, kw, sw, ow)
            for ch in range(c):
                gx[b, y, xx, ch] = 0.0
            for di in range(di_lo, di_hi + 1, sh):
                i = (y + pt - di) // sh
                for dj in range(dj_lo, dj_hi + 1, sw):
                    j = (xx + pl - dj) // sw
                    tap = di * kw + dj
                    for ch in range(c):
                        if arg[b, i, j, ch] == tap:
                            gx[b, y, xx, ch] += gy[b, i, j, ch]


def _geometry(window, stride, pads):
    (kh, kw), (sh, sw), ((pt, _), (pl, _)) = window, stride, pads
    return kh, kw, sh, sw, pt, pl


def im2col(x, window, stride, pads, out_hw, body: str | None = None):
    """Column matrix of a window sweep. Shapes: x (B, H, W, C) -> (B*OH*OW, kh*kw*C)"""
    if _dispatch.pick_body("im2col", x, body) != "cpu":
        return im2col_ref(x, window, stride, pads, out_hw)
    _dispatch.cpu_ready()
    b, _, _, c = x.shape
    cols = np.empty((b, *out_hw, *window, c), dtype=x.dtype)  # (B, OH, OW, kh, kw, C)
    _im2col_cpu(x, *_geometry(window, stride, pads), cols)
    return cols.reshape(b * out_hw[0] * out_hw[1], -1)


def col2im(gcols, x_shape, window, stride, pads, out_hw, body: str | None = None):
    """Adjoint of `im2col`: column gradients summed onto the image.

    Shapes: gcols (B*OH*OW, kh*kw*C) -> (B, H, W, C)
    """
    if _dispatch.pick_body("col2im", gcols, body) != "cpu":
        return col2im_ref(gcols, x_shape, window, stride, pads, out_hw)
    _dispatch.cpu_ready()
    g6 = np.ascontiguousarray(gcols).reshape(x_shape[0], *out_hw, *window, x_shape[3])
    gx = np.empty(x_shape, dtype=gcols.dtype)
    _col2im_cpu(g6, *_geometry(window, stride, pads), gx)
    return gx


def max_pool_forward(x, window, stride, pads, out_hw, body: str | None = None):
    """Max pooling with -inf padding; also which tap won.

    Shapes: x (B, H, W, C) -> y (B, OH, OW, C), arg (B, OH, OW, C) int16
    """
    if _dispatch.pick_body("max_pool_forward", x, body) != "cpu":
        return max_pool_forward_ref(x, window, stride, pads, out_hw)
    _dispatch.cpu_ready()
    shape = (x.shape[0], *out_hw, x.shape[3])
    y, arg = np.empty(shape, dtype=x.dtype), np.empty(shape, dtype=np.int16)
    _max_pool_forward_cpu(x, *_geometry(window, stride, pads), y, arg)
    return y, arg


def max_pool_backward(gy, arg, x_shape, window, stride, pads, body: str | None = None):
    """Each output gradient sent to the pixel of its winning tap. Shapes: gy, arg -> (B,H,W,C)"""
    if _dispatch.pick_body("max_pool_backward", gy, body) != "cpu":
        return max_pool_backward_ref(gy, arg, x_shape, window, stride, pads)
    _dispatch.cpu_ready()
    gx = np.empty(x_shape, dtype=gy.dtype)
    _max_pool_backward_cpu(gy, arg, *_geometry(window, stride, pads), gx)
    return gx
