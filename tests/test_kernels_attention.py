"""Attention kernels: reference vs naive softmax(QK^T)V and finite differences; CPU body vs it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minivit.kernels import (
    attention,
    attention_backward,
    attention_backward_ref,
    attention_forward,
    attention_forward_ref,
)

# (B, NH, N, K): every ViT token count (cls + grid: 2x2, 7x7, 14x14, 16x16, 24x24, 32x32)
SHAPES = [
    (2, 3, 5, 32),
    (2, 2, 50, 80),
    (2, 2, 197, 64),
    (1, 3, 257, 32),
    (1, 2, 577, 80),
    (1, 1, 1025, 64),
    (1, 1, 1, 80),
]


def assert_matches(got, ref, rtol=1e-5, scale=0.0):
    """Agreement to `rtol` relative to the reference's largest magnitude (or `scale` when that
    is larger), element by element."""
    atol = rtol * max(float(np.abs(ref).max()), scale)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


def _inputs(shape, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * spread).astype(np.float32) for _ in range(4)]


def _naive(q, k, v):
    """softmax(q k^T / sqrt(K)) v head by head, with the softmax written out (float64)."""
    o = np.empty(q.shape)
    lse = np.empty(q.shape[:3])
    for b, h in np.ndindex(*q.shape[:2]):
        e = np.exp(q[b, h] @ k[b, h].T / math.sqrt(q.shape[-1]))  # (N, N)
        o[b, h] = (e / e.sum(-1, keepdims=True)) @ v[b, h]
        lse[b, h] = np.log(e.sum(-1))
    return o, lse


def test_reference_forward_matches_naive_softmax():
    q, k, v, _ = (a.astype(np.float64) for a in _inputs((2, 3, 9, 8)))
    o, lse = attention_forward_ref(q, k, v)
    naive_o, naive_lse = _naive(q, k, v)
    assert_matches(o, naive_o, rtol=1e-6)
    assert_matches(lse, naive_lse, rtol=1e-6)


def test_reference_backward_matches_finite_differences():
    q, k, v, go = (a.astype(np.float64) for a in _inputs((1, 2, 6, 4), seed=1))
    o, lse = attention_forward_ref(q, k, v)
    grads = attention_backward_ref(go, q, k, v, o, lse)
    rng = np.random.default_rng(2)
    dirs = [rng.standard_normal(q.shape) for _ in range(3)]

    def along(t):
        return np.vdot(go, _naive(*[a + t * d for a, d in zip((q, k, v), dirs)])[0])

    numeric = (along(1e-6) - along(-1e-6)) / 2e-6
    analytic = sum(np.vdot(g.astype(np.float64), d) for g, d in zip(grads, dirs))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


def _check_cpu(shape, seed=0, spread=1.0):
    q, k, v, go = _inputs(shape, seed, spread)
    o, lse = attention_forward(q, k, v, body="cpu")
    ref_o, ref_lse = attention_forward_ref(q, k, v)
    assert o.dtype == np.float32 and lse.shape == shape[:3]
    assert_matches(o, ref_o)
    assert_matches(lse, ref_lse)
    grads = attention_backward(go, q, k, v, o, lse, body="cpu")
    refs = attention_backward_ref(go, q, k, v, ref_o, ref_lse)
    for g, r in zip(grads, refs):  # with one token gq = gk = 0: measure them on gv's scale
        assert g.dtype == np.float32
        assert_matches(g, r, scale=float(np.abs(refs[2]).max()))


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_matches_reference(shape):
    _check_cpu(shape, seed=shape[2])


def test_cpu_online_softmax_over_many_small_blocks(monkeypatch):
    monkeypatch.setattr(attention, "Q_BLOCK", 16)
    monkeypatch.setattr(attention, "KV_BLOCK", 24)  # 197 keys: 8 full blocks and one of 5
    _check_cpu((2, 2, 197, 32), seed=3, spread=3.0)  # sharp softmax: the running max moves


def test_rejects_mismatched_shapes_with_a_layout_hint():
    q = np.zeros((1, 2, 5, 8), np.float32)
    with pytest.raises(ValueError, match=r"axes \(0, 2, 1, 3\)"):
        attention_forward(q, q, q.transpose(0, 2, 1, 3), body="cpu")


def test_cpu_body_reads_strided_and_broadcast_heads():
    # the flax op hands over (B, N, NH, K) memory as (B, NH, N, K) views; a broadcast key (row
    # stride 0) and a reversed head axis must still give the reference's numbers
    rng = np.random.default_rng(9)
    q, k, v, go = (rng.standard_normal((2, 37, 3, 16)).astype(np.float32) for _ in range(4))
    qh, vh, goh = (a.transpose(0, 2, 1, 3) for a in (q, v, go))
    kh = np.broadcast_to(k[:, :1].transpose(0, 2, 1, 3), qh.shape)  # one key row for all
    vh = vh[:, ::-1]
    o, lse = attention_forward(qh, kh, vh, body="cpu")
    o_ref, lse_ref = attention_forward_ref(qh, kh, vh)
    assert_matches(o, o_ref)
    assert_matches(lse, lse_ref)
    got = attention_backward(goh, qh, kh, vh, o, lse, body="cpu")
    want = attention_backward_ref(goh, qh, kh, vh, o_ref, lse_ref)
    for g, w in zip(got, want):  # gq is ~0 here (equal keys): compare on the scale of go
        assert_matches(g, w, rtol=2e-5, scale=1.0)
    assert o.transpose(0, 2, 1, 3).flags.c_contiguous  # the outputs take q's (B, N, NH, K) layout


@pytest.mark.parametrize(
    ("pairs", "n", "threads", "block"),
    [
        (3, 197, 2, 50),  # 12 tasks of 64, 64, 64, 5 rows: 325 against 266 rows; even: 300 each
        (6, 197, 2, 64),  # both threads get 591 rows of blocks of 64, 600 of blocks of 50
        (96, 197, 2, 64),  # batch 32: many tasks, already even
        (1, 128, 2, 64),  # two full blocks: nothing to balance
        (1, 1, 2, 64),
    ],
)
def test_query_block_evens_out_the_threads_work(pairs, n, threads, block):
    assert attention.query_block(pairs, n, threads) == block


def test_makespan_counts_the_rows_of_every_task():
    for pairs, n, block, threads in [(3, 197, 64, 2), (3, 197, 50, 2), (5, 70, 16, 3)]:
        blocks = -(-n // block)
        rows = [min(block, n - (t % blocks) * block) for t in range(pairs * blocks)]
        tasks = len(rows)
        runs = [rows[t * tasks // threads : (t + 1) * tasks // threads] for t in range(threads)]
        assert attention._makespan(pairs, n, block, threads) == max(sum(r) for r in runs)


@pytest.mark.parametrize("body", ["cpu", "ref"])
def test_backward_writes_into_views_of_one_packed_buffer(body):
    # PackedAttention hands over the q, k and v slots of one (B, N, 3, NH, K) gradient buffer
    rng = np.random.default_rng(11)
    qkv = rng.standard_normal((2, 37, 3, 3, 16)).astype(np.float32)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, NH, N, K) views
    go = rng.standard_normal(q.shape).astype(np.float32)
    o, lse = attention_forward(q, k, v, body=body)
    packed = np.full(qkv.shape, np.nan, np.float32)
    out = tuple(packed[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    got = attention_backward(go, q, k, v, o, lse, body=body, out=out)
    want = attention_backward_ref(go, q, k, v, *attention_forward_ref(q, k, v))
    for g, slot, w in zip(got, out, want):
        assert g is slot
        assert_matches(g, w, scale=float(np.abs(want[2]).max()))
    assert not np.isnan(packed).any()  # every slot written


def test_backward_rejects_an_out_it_cannot_write_as_rows():
    q, k, v, go = _inputs((1, 2, 5, 8))
    o, lse = attention_forward(q, k, v, body="cpu")
    wrong = (np.zeros_like(q), np.zeros_like(q), np.zeros((1, 2, 5, 7), np.float32))
    with pytest.raises(ValueError, match=r"out must be three float32 arrays of q's shape"):
        attention_backward(go, q, k, v, o, lse, body="cpu", out=wrong)
    with pytest.raises(ValueError, match="unit element stride"):
        attention_backward(go, q, k, v, o, lse, body="cpu", out=(q[..., ::2],) * 3)
