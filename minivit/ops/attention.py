"""Multi-head dot-product attention in the flax layout (plain version; fused kernel elsewhere).

Matches flax `dot_product_attention` as the official `MultiHeadDotProductAttention` calls it:
`q = q / sqrt(K)`, `a = softmax_k(einsum('bqhd,bkhd->bhqk', q, k))`, optional dropout on `a`
(one mask entry per weight, `broadcast_dropout=False` as in the ViT encoder block),
`o = einsum('bhqk,bkhd->bqhd', a, v)`.
"""

from __future__ import annotations

import math

import numpy as np

from minivit import kernels
from minivit.autograd import Function, Tensor


class DotProductAttention(Function):
    """softmax(q k^T / sqrt(K)) v per head, the weights optionally dropped out.

    Shapes: q (B, Nq, NH, K), k and v (B, Nk, NH, K) -> o (B, Nq, NH, K)
    """

    def __init__(self, dropout_rate: float = 0.0, rng: np.random.Generator | None = None):
        self.dropout_rate = dropout_rate
        self.rng = rng

    def _check(self, q, k, v):
        same_heads = q.ndim == 4 and (q.shape[0], *q.shape[2:]) == (k.shape[0], *k.shape[2:])
        if k.ndim != 4 or k.shape != v.shape or not same_heads:
            raise self.shape_error(
                f"q {q.shape}, k {k.shape} and v {v.shape} must be (B, N, NH, K) with the same "
                "B, NH and K, and k and v of one shape"
            )

    def _dropout_mask(self, xp, shape, dtype):
        """The keep mask scaled by 1/keep, or None when no dropout applies."""
        if self.dropout_rate == 0.0:
            return None
        keep = 1.0 - self.dropout_rate
        mask = xp.asarray(self.rng.random(shape, dtype=np.float32) < keep).astype(dtype)
        return mask * (1.0 / keep if keep > 0 else 0.0)

    def forward(self, xp, q, k, v):
        self._check(q, k, v)
        self.fused = self.dropout_rate == 0.0 and q.shape == k.shape and kernels.fusable(q, k, v)
        if self.fused:
            return self._fused_forward(q, k, v)
        heads = [xp.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v)]  # BLAS-ready
        qh = heads[0] / math.sqrt(q.shape[-1])  # (B, NH, Nq, K)
        kh, vh = heads[1:]  # (B, NH, Nk, K) each
        logits = qh @ kh.transpose(0, 1, 3, 2)  # (B, NH, Nq, Nk)
        weights = xp.exp(logits - logits.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        mask = self._dropout_mask(xp, weights.shape, weights.dtype)
        dropped = weights if mask is None else weights * mask
        self.save(qh, kh, vh, weights, mask, dropped)
        return (dropped @ vh).transpose(0, 2, 1, 3)  # (B, Nq, NH, K)

    def _fused_forward(self, q, k, v):
        """FlashAttention-style kernel: keeps only o and the per-row log-sum-exp for backward."""
        qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, NH, N, K) views
        o, lse = kernels.attention_forward(qh, kh, vh)  # (B, NH, N, K), (B, NH, N)
        self.save(qh, kh, vh, o, lse)
        return o.transpose(0, 2, 1, 3)  # (B, N, NH, K)

    def backward(self, xp, gy):
        return self.gradients(xp, gy, self.needs_grad)

    def gradients(self, xp, gy, needs, out=None) -> tuple:
        """gq, gk, gv (None where `needs` is False), or all three written into `out`.

        Shapes: gy (B, Nq, NH, K) -> (B, Nq, NH, K), (B, Nk, NH, K) x 2; `out` such arrays
        """
        if self.fused:
            go = gy.transpose(0, 2, 1, 3)  # (B, NH, N, K)
            into = None if out is None else tuple(g.transpose(0, 2, 1, 3) for g in out)
            grads = kernels.attention_backward(go, *self.saved, out=into)
            return tuple(g.transpose(0, 2, 1, 3) for g in grads)  # (B, N, NH, K) each
        qh, kh, vh, weights, mask, dropped = self.saved
        go = xp.ascontiguousarray(gy.transpose(0, 2, 1, 3))  # (B, NH, Nq, K)
        gv = dropped.transpose(0, 1, 3, 2) @ go if needs[2] else None  # (B, NH, Nk, K)
        gq = gk = None
        if needs[0] or needs[1]:
            gw = go @ vh.transpose(0, 1, 3, 2)  # (B, NH, Nq, Nk)
            if mask is not None:
                gw *= mask
            glogits = weights * (gw - (gw * weights).sum(axis=-1, keepdims=True))
            if needs[0]:
                gq = (glogits @ kh) / math.sqrt(qh.shape[-1])  # (B, NH, Nq, K)
            if needs[1]:
                gk = glogits.transpose(0, 1, 3, 2) @ qh  # (B, NH, Nk, K)
        grads = tuple(None if g is None else g.transpose(0, 2, 1, 3) for g in (gq, gk, gv))
        if out is None:
            return grads
        for dst, g in zip(out, grads):
            dst[...] = g
        return tuple(out)


class PackedAttention(DotProductAttention):
    """Self-attention on one packed projection: q, k and v are slices of a (B, N, 3, NH, K)
    array (`heads_projections`), so their gradients land in one buffer of that layout, which the
    projection's backward reads as the rows of one GEMM.

    Shapes: qkv (B, N, 3, NH, K) -> o (B, N, NH, K)
    """

    def forward(self, xp, qkv):
        if qkv.ndim != 5 or qkv.shape[2] != 3:
            raise self.shape_error(
                f"qkv of shape {qkv.shape} must be (B, N, 3, NH, K): query, key and value "
                "stacked on axis 2"
            )
        return super().forward(xp, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])

    def backward(self, xp, gy):
        packed = self.inputs[0]
        g = xp.empty(packed.shape, packed.dtype)  # (B, N, 3, NH, K)
        self.gradients(xp, gy, (True, True, True), out=(g[:, :, 0], g[:, :, 1], g[:, :, 2]))
        return g


def dot_product_attention(
    q, k, v, dropout_rate: float = 0.0, rng: np.random.Generator | None = None
) -> Tensor:
    """Multi-head attention weights applied to v, flax layout; q is scaled by 1/sqrt(K) inside.

    Shapes: q (B, Nq, NH, K), k and v (B, Nk, NH, K) -> (B, Nq, NH, K)
    """
    _check_dropout(dropout_rate, rng)
    return DotProductAttention(dropout_rate, rng)(q, k, v)


def _check_dropout(dropout_rate: float, rng) -> None:
    if not 0.0 <= dropout_rate <= 1.0:
        raise ValueError(
            f"dot_product_attention: dropout_rate must lie in [0, 1], got {dropout_rate}"
        )
    if dropout_rate > 0.0 and rng is None:
        raise ValueError(
            f"dot_product_attention: dropout_rate {dropout_rate} needs rng, a np.random.Generator"
        )


def packed_attention(
    qkv, dropout_rate: float = 0.0, rng: np.random.Generator | None = None
) -> Tensor:
    """`dot_product_attention` of the query, key and value packed on axis 2 of one array.

    Shapes: qkv (B, N, 3, NH, K) -> (B, N, NH, K)
    """
    _check_dropout(dropout_rate, rng)
    return PackedAttention(dropout_rate, rng)(qkv)
