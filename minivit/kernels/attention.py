"""Scaled dot-product attention, the FlashAttention recipe (Dao et al. 2022; Dao 2023).

`o = softmax(q k^T / sqrt(K)) v` per batch and head, no mask, like flax
`dot_product_attention` (the query is scaled by 1/sqrt(K) before the product). The fused bodies
never hold a (N, N) matrix: the forward walks blocks of keys for each block of queries with an
online softmax (running row max and sum, rescaling the partial output when the max grows) and
keeps only the per-row log-sum-exp `lse`; the backward recomputes each block of probabilities
`p = exp(s - lse)` from it. Extra memory is O(B NH N) plus O(block^2) per thread.

CPU body: Numba threads take one block of queries of one (batch, head) pair each in the forward
(so batch 1 with 3 heads still fills the cores), one pair each in the backward (whose key
gradients sum over query blocks). The block products go to BLAS `sgemm`
(`_blas.gemm`, limited to one thread per Numba thread), which reads each head in place from
strided inputs (the flax op's transposed views), folds the 1/sqrt(K) scale into its alpha and
accumulates the gradients in the outputs; the outputs keep the inputs' memory layout, so the op
reshapes them without copies. The softmax and rescaling are Numba loops.
GPU body: one thread per query row (forward, dq) or key row (dk, dv), key / query tiles staged
in shared memory; the backward runs the two kernels FlashAttention-2 style, without atomics.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import cuda  # the simulator swaps this global for NUMBA_ENABLE_CUDASIM=1

from minivit import backend
from minivit.kernels import _blas, _dispatch
from minivit.kernels._vecmath import exp32, from_ordered_bits, ordered_bits

Q_BLOCK = 64  # query rows per CPU block
KV_BLOCK = 512  # keys per CPU block; N <= KV_BLOCK needs no online rescaling
GPU_ROWS = 64  # threads (query or key rows) per GPU block
GPU_TILE = 32  # keys (or queries) per shared-memory tile
GPU_MAX_HEAD = 128  # largest head_dim the GPU kernels hold in registers
_N, _T = _blas.N, _blas.T
_NO_MAX = np.float32(-3.0e38)  # running max before any key: finite, as fastmath assumes no inf


def attention_forward_ref(q, k, v):
    """The spec: the plain (N, N) computation in float64.

    Shapes: q, k, v (B, NH, N, K) -> o (B, NH, N, K), lse (B, NH, N)
    """
    q64, k64, v64 = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    s = np.einsum("bhqd,bhkd->bhqk", q64 / math.sqrt(q.shape[-1]), k64)  # (B, NH, N, N)
    top = s.max(axis=-1, keepdims=True)  # (B, NH, N, 1)
    lse = top + np.log(np.exp(s - top).sum(axis=-1, keepdims=True))  # (B, NH, N, 1)
    o = np.exp(s - lse) @ v64  # (B, NH, N, K)
    return o.astype(np.float32), lse[..., 0].astype(np.float32)


def attention_backward_ref(go, q, k, v, o, lse):
    """The spec of the backward, plain (N, N) computation in float64.

    Shapes: go, q, k, v, o (B, NH, N, K), lse (B, NH, N) -> gq, gk, gv (B, NH, N, K)
    """
    go64, q64, k64, v64, o64 = (np.asarray(a, dtype=np.float64) for a in (go, q, k, v, o))
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = np.einsum("bhqd,bhkd->bhqk", q64 * scale, k64)  # (B, NH, N, N)
    p = np.exp(s - np.asarray(lse, np.float64)[..., None])  # (B, NH, N, N)
    gv = np.einsum("bhqk,bhqd->bhkd", p, go64)  # (B, NH, N, K)
    gp = np.einsum("bhqd,bhkd->bhqk", go64, v64)  # (B, NH, N, N)
    delta = (go64 * o64).sum(axis=-1, keepdims=True)  # (B, NH, N, 1): sum_k p gp
    gs = p * (gp - delta)  # (B, NH, N, N)
    gq = np.einsum("bhqk,bhkd->bhqd", gs, k64) * scale  # (B, NH, N, K)
    gk = np.einsum("bhqk,bhqd->bhkd", gs, q64) * scale  # (B, NH, N, K)
    return gq.astype(np.float32), gk.astype(np.float32), gv.astype(np.float32)


@numba.njit(inline="always", fastmath=True, cache=True)
def _online_softmax(s, row_max, row_sum, acc):
    """Turn scores s (m, n) into exp(s - new max) in place; rescale row sums and outputs."""
    for r in range(s.shape[0]):
        key = ordered_bits(row_max[r])
        for c in range(s.shape[1]):
            key = max(key, ordered_bits(s[r, c]))  # an int max vectorises, a float max does not
        top = from_ordered_bits(key)
        alpha = exp32(row_max[r] - top)  # ~0 on the first block (row_max = _NO_MAX)
        total = np.float32(0.0)
        for c in range(s.shape[1]):
            e = exp32(s[r, c] - top)
            s[r, c] = e
            total += e
        row_sum[r] = row_sum[r] * alpha + total
        row_max[r] = top
        for d in range(acc.shape[1]):
            acc[r, d] *= alpha


@numba.njit(parallel=True, fastmath=True, cache=True)
def _forward_cpu(q, k, v, q_block, kv_block, o, lse):
    b_size, heads, n, dim = q.shape
    scale = np.float32(1.0 / math.sqrt(dim))
    one, zero = np.float32(1.0), np.float32(0.0)
    q_blocks = -(-n // q_block)
    for t in numba.prange(b_size * heads * q_blocks):  # one block of queries per task
        b, h, i0 = t // (heads * q_blocks), (t // q_blocks) % heads, (t % q_blocks) * q_block
        qh, kh, vh = q[b, h], k[b, h], v[b, h]  # (N, K) strided blocks, read in place by BLAS
        i1 = min(i0 + q_block, n)
        acc = np.zeros((i1 - i0, dim), np.float32)  # (m, K): unnormalised output
        row_max = np.full(i1 - i0, _NO_MAX, np.float32)
        row_sum = np.zeros(i1 - i0, np.float32)
        for j0 in range(0, n, kv_block):
            j1 = min(j0 + kv_block, n)
            s = np.empty((i1 - i0, j1 - j0), np.float32)  # (m, n_blk): scaled scores
            _blas.gemm(_N, _T, i1 - i0, j1 - j0, dim, scale, qh[i0:i1], kh[j0:j1], zero, s)
            _online_softmax(s, row_max, row_sum, acc)
            _blas.gemm(_N, _N, i1 - i0, dim, j1 - j0, one, s, vh[j0:j1], one, acc)
        for r in range(i1 - i0):
            inv = one / row_sum[r]
            for d in range(dim):
                o[b, h, i0 + r, d] = acc[r, d] * inv
            lse[b, h, i0 + r] = row_max[r] + math.log(row_sum[r])


@numba.njit(inline="always", fastmath=True, cache=True)
def _probs_and_grad(s, gp, lse, delta):
    """s <- p = exp(s - lse); gp <- gs = p (gp - delta), in place. Shapes: s, gp (m, n)."""
    for r in range(s.shape[0]):
        for c in range(s.shape[1]):
            p = exp32(s[r, c] - lse[r])
            s[r, c] = p
            gp[r, c] = p * (gp[r, c] - delta[r])


@numba.njit(parallel=True, fastmath=True, cache=True)
def _backward_cpu(go, q, k, v, o, lse, q_block, kv_block, gq, gk, gv):
    b_size, heads, n, dim = q.shape
    scale = np.float32(1.0 / math.sqrt(dim))
    one, zero = np.float32(1.0), np.float32(0.0)
    for t in numba.prange(b_size * heads):  # one (batch, head) pair per task
        b, h = t // heads, t % heads
        qh, kh, vh, goh = q[b, h], k[b, h], v[b, h], go[b, h]  # (N, K) strided blocks
        gqh, gkh, gvh = gq[b, h], gk[b, h], gv[b, h]  # accumulated in place by BLAS
        delta = np.empty(n, np.float32)  # (N,): rowsum(go * o) = rowsum(p * gp)
        for r in range(n):
            total = zero
            for d in range(dim):
                total += goh[r, d] * o[b, h, r, d]
                gqh[r, d], gkh[r, d], gvh[r, d] = zero, zero, zero
            delta[r] = total
        for j0 in range(0, n, kv_block):
            j1 = min(j0 + kv_block, n)
            m_kv = j1 - j0
            kj, vj = kh[j0:j1], vh[j0:j1]  # (n_blk, K)
            for i0 in range(0, n, q_block):
                i1 = min(i0 + q_block, n)
                m = i1 - i0
                qi, go_i = qh[i0:i1], goh[i0:i1]  # (m, K)
                s = np.empty((m, m_kv), np.float32)  # scaled scores, then p
                gs = np.empty((m, m_kv), np.float32)  # gp = go v^T, then gs in place
                _blas.gemm(_N, _T, m, m_kv, dim, scale, qi, kj, zero, s)
                _blas.gemm(_N, _T, m, m_kv, dim, one, go_i, vj, zero, gs)
                _probs_and_grad(s, gs, lse[b, h, i0:i1], delta[i0:i1])
                _blas.gemm(_T, _N, m_kv, dim, m, one, s, go_i, one, gvh[j0:j1])
                _blas.gemm(_N, _N, m, dim, m_kv, scale, gs, kj, one, gqh[i0:i1])
                _blas.gemm(_T, _N, m_kv, dim, m, scale, gs, qi, one, gkh[j0:j1])


def _makespan(pairs: int, n: int, block: int, threads: int) -> int:
    """Query rows of the busiest thread when `pairs` (batch, head) pairs of `n` queries are cut
    into blocks of `block` rows, one task each, and the tasks are dealt out in equal contiguous
    runs, as Numba's static schedule deals a `prange`."""
    blocks = -(-n // block)
    short = blocks * block - n  # rows the last block of each pair lacks
    tasks, busiest = pairs * blocks, 0
    for t in range(threads):
        a, b = t * tasks // threads, (t + 1) * tasks // threads
        busiest = max(busiest, (b - a) * block - (b // blocks - a // blocks) * short)
    return busiest


def query_block(pairs: int, n: int, threads: int) -> int:
    """Query rows per forward task: `Q_BLOCK`, unless the fewest equal blocks of at most that many
    rows leave the busiest thread 2% less work. 197 queries at batch 1 with 3 heads: blocks of 64
    give one thread 325 rows and the other 266, 4 blocks of 50 give both 300 (the forward took
    200 instead of 213 us on 2 cores); with 6 heads both cuts are even and 64 rows run faster."""
    even = -(-n // -(-n // Q_BLOCK)) if n > 0 else Q_BLOCK
    if even == Q_BLOCK:
        return Q_BLOCK
    plain, balanced = (_makespan(pairs, n, b, threads) for b in (Q_BLOCK, even))
    return even if balanced < 0.98 * plain else Q_BLOCK


def _forward_cpu_body(q, k, v):
    _dispatch.cpu_ready()
    o = np.empty_like(q)  # q's layout: (B, N, NH, K) memory for the flax op's transposed views
    lse = np.empty(q.shape[:3], np.float32)
    with _dispatch.blas_single_thread():
        block = query_block(q.shape[0] * q.shape[1], q.shape[2], numba.get_num_threads())
        _forward_cpu(q, k, v, block, KV_BLOCK, o, lse)
    return o, lse


def _backward_cpu_body(go, q, k, v, o, lse, out=None):
    _dispatch.cpu_ready()
    if out is None:
        out = np.empty_like(q), np.empty_like(k), np.empty_like(v)  # the inputs' layouts
    gq, gk, gv = out  # zeroed, then accumulated in place by the kernel
    with _dispatch.blas_single_thread():
        _backward_cpu(go, q, k, v, o, lse, Q_BLOCK, KV_BLOCK, gq, gk, gv)
    return gq, gk, gv


@functools.cache
def _gpu_kernels(rows: int, tile: int, max_head: int):
    """Compile the GPU kernels once per (rows, tile, max_head), on first use."""
    f32 = numba.float32

    @cuda.jit(device=True)
    def stage(dst, src, b, h, start, scale):
        """Copy rows start.. of src[b, h] (times scale) into the shared tile dst, cooperatively."""
        n, dim = src.shape[2], src.shape[3]
        for e in range(cuda.threadIdx.x, tile * dim, rows):
            r, d = e // dim, e % dim
            if start + r < n:
                dst[r, d] = src[b, h, start + r, d] * scale

    @cuda.jit(device=True)
    def dot(a, tile_rows, r, dim):
        total = f32(0.0)
        for d in range(dim):
            total += a[d] * tile_rows[r, d]
        return total

    @cuda.jit
    def forward(q, k, v, o, lse):
        b, h = cuda.blockIdx.y // q.shape[1], cuda.blockIdx.y % q.shape[1]
        n, dim = q.shape[2], q.shape[3]
        i = cuda.blockIdx.x * rows + cuda.threadIdx.x  # this thread's query row
        kt = cuda.shared.array((tile, max_head), f32)
        vt = cuda.shared.array((tile, max_head), f32)
        q_row = cuda.local.array(max_head, f32)
        acc = cuda.local.array(max_head, f32)
        scores = cuda.local.array(tile, f32)
        scale = f32(1.0 / math.sqrt(dim))
        for d in range(dim):
            q_row[d] = q[b, h, i, d] * scale if i < n else f32(0.0)
            acc[d] = f32(0.0)
        row_max, row_sum = f32(-math.inf), f32(0.0)
        for j0 in range(0, n, tile):
            cuda.syncthreads()
            stage(kt, k, b, h, j0, f32(1.0))
            stage(vt, v, b, h, j0, f32(1.0))
            cuda.syncthreads()
            count = tile if n - j0 > tile else n - j0  # no builtin min/max in CUDA code
            top = row_max
            for r in range(count):
                scores[r] = dot(q_row, kt, r, dim)
                top = scores[r] if scores[r] > top else top
            alpha = math.exp(row_max - top)
            row_sum *= alpha
            for d in range(dim):
                acc[d] *= alpha
            for r in range(count):
                p = math.exp(scores[r] - top)
                row_sum += p
                for d in range(dim):
                    acc[d] += p * vt[r, d]
            row_max = top
        if i < n:
            for d in range(dim):
                o[b, h, i, d] = acc[d] / row_sum
            lse[b, h, i] = row_max + math.log(row_sum)

    @cuda.jit
    def backward_q(go, q, k, v, o, lse, delta, gq):
        b, h = cuda.blockIdx.y // q.shape[1], cuda.blockIdx.y % q.shape[1]
        n, dim = q.shape[2], q.shape[3]
        i = cuda.blockIdx.x * rows + cuda.threadIdx.x  # this thread's query row
        kt = cuda.shared.array((tile, max_head), f32)
        vt = cuda.shared.array((tile, max_head), f32)
        q_row = cuda.local.array(max_head, f32)
        go_row = cuda.local.array(max_head, f32)
        acc = cuda.local.array(max_head, f32)
        scale = f32(1.0 / math.sqrt(dim))
        row_delta = f32(0.0)
        for d in range(dim):
            q_row[d] = q[b, h, i, d] * scale if i < n else f32(0.0)
            go_row[d] = go[b, h, i, d] if i < n else f32(0.0)
            row_delta += go_row[d] * (o[b, h, i, d] if i < n else f32(0.0))
            acc[d] = f32(0.0)
        row_lse = lse[b, h, i] if i < n else f32(0.0)
        for j0 in range(0, n, tile):
            cuda.syncthreads()
            stage(kt, k, b, h, j0, f32(1.0))
            stage(vt, v, b, h, j0, f32(1.0))
            cuda.syncthreads()
            for r in range(tile if n - j0 > tile else n - j0):
                p = math.exp(dot(q_row, kt, r, dim) - row_lse)
                gs = p * (dot(go_row, vt, r, dim) - row_delta)
                for d in range(dim):
                    acc[d] += gs * kt[r, d]
        if i < n:
            delta[b, h, i] = row_delta
            for d in range(dim):
                gq[b, h, i, d] = acc[d] * scale

    @cuda.jit
    def backward_kv(go, q, k, v, lse, delta, gk, gv):
        b, h = cuda.blockIdx.y // q.shape[1], cuda.blockIdx.y % q.shape[1]
        n, dim = q.shape[2], q.shape[3]
        j = cuda.blockIdx.x * rows + cuda.threadIdx.x  # this thread's key row
        qt = cuda.shared.array((tile, max_head), f32)
        got = cuda.shared.array((tile, max_head), f32)
        lse_t = cuda.shared.array(tile, f32)
        delta_t = cuda.shared.array(tile, f32)
        k_row = cuda.local.array(max_head, f32)
        v_row = cuda.local.array(max_head, f32)
        acc_k = cuda.local.array(max_head, f32)
        acc_v = cuda.local.array(max_head, f32)
        for d in range(dim):
            k_row[d] = k[b, h, j, d] if j < n else f32(0.0)
            v_row[d] = v[b, h, j, d] if j < n else f32(0.0)
            acc_k[d] = f32(0.0)
            acc_v[d] = f32(0.0)
        for i0 in range(0, n, tile):
            cuda.syncthreads()
            stage(qt, q, b, h, i0, f32(1.0 / math.sqrt(dim)))
            stage(got, go, b, h, i0, f32(1.0))
            count = tile if n - i0 > tile else n - i0
            for r in range(cuda.threadIdx.x, count, rows):
                lse_t[r] = lse[b, h, i0 + r]
                delta_t[r] = delta[b, h, i0 + r]
            cuda.syncthreads()
            for r in range(count):
                p = math.exp(dot(k_row, qt, r, dim) - lse_t[r])
                gs = p * (dot(v_row, got, r, dim) - delta_t[r])
                for d in range(dim):
                    acc_v[d] += p * got[r, d]
                    acc_k[d] += gs * qt[r, d]  # qt carries the scale
        if j < n:
            for d in range(dim):
                gk[b, h, j, d] = acc_k[d]
                gv[b, h, j, d] = acc_v[d]

    return forward, backward_q, backward_kv


def _gpu_launch(q) -> tuple:
    return (_dispatch.blocks(q.shape[2], GPU_ROWS), q.shape[0] * q.shape[1]), GPU_ROWS


def _forward_gpu_body(q, k, v):
    xp = backend.xp_of(q)
    forward, _, _ = _gpu_kernels(GPU_ROWS, GPU_TILE, GPU_MAX_HEAD)
    o = xp.empty_like(q)
    lse = xp.empty(q.shape[:3], np.float32)
    grid, threads = _gpu_launch(q)
    forward[grid, threads](q, k, v, o, lse)
    return o, lse


def _backward_gpu_body(go, q, k, v, o, lse):
    xp = backend.xp_of(q)
    _, backward_q, backward_kv = _gpu_kernels(GPU_ROWS, GPU_TILE, GPU_MAX_HEAD)
    gq, gk, gv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
    delta = xp.empty(q.shape[:3], np.float32)  # (B, NH, N): rowsum(go * o), written by backward_q
    grid, threads = _gpu_launch(q)
    backward_q[grid, threads](go, q, k, v, o, lse, delta, gq)
    backward_kv[grid, threads](go, q, k, v, lse, delta, gk, gv)
    return gq, gk, gv


def _blas_ready(a) -> bool:
    """Rows BLAS can read in place: unit element stride, a row stride of at least a row."""
    return a.ndim < 2 or (a.strides[-1] == 4 and a.strides[-2] >= 4 * a.shape[-1])


def _float32(*arrays) -> list:
    return [a.astype(np.float32, copy=False) for a in arrays]


def _prepared(kernel: str, body: str, q, *others):
    """Check the (B, NH, N, K) shapes; float32 arrays (C-contiguous for the GPU body)."""
    for a in (q, *others[:4]):
        if a.ndim != 4 or a.shape != q.shape:
            raise ValueError(
                f"{kernel}: q, k, v (and go, o) must share one (B, NH, N, K) shape, got "
                f"{tuple(a.shape)} next to q's {tuple(q.shape)}; transpose flax's (B, N, NH, K) "
                "with axes (0, 2, 1, 3)"
            )
    if body == "gpu" and q.shape[-1] > GPU_MAX_HEAD:
        raise ValueError(
            f"{kernel}: head_dim {q.shape[-1]} exceeds the GPU body's GPU_MAX_HEAD "
            f"{GPU_MAX_HEAD}; raise minivit.kernels.attention.GPU_MAX_HEAD"
        )
    if body == "cpu":  # BLAS reads each head in place: any row stride, unit element stride
        return [a if _blas_ready(a) else np.ascontiguousarray(a) for a in _float32(q, *others)]
    return _dispatch.float32_rows(backend.xp_of(q), q, *others)


def attention_forward(q, k, v, body: str | None = None):
    """Fused attention forward: output and per-row log-sum-exp of the scaled scores.

    Shapes: q, k, v (B, NH, N, K) -> o (B, NH, N, K), lse (B, NH, N)
    """
    chosen = _dispatch.pick_body("attention_forward", q, body)
    q, k, v = _prepared("attention_forward", chosen, q, k, v)
    if chosen == "ref":
        return attention_forward_ref(q, k, v)
    return (_forward_cpu_body if chosen == "cpu" else _forward_gpu_body)(q, k, v)


def _check_out(out, q) -> None:
    """Raise a one-sentence error unless `out` is three float32 arrays BLAS can write as rows."""
    if len(out) != 3 or any(
        g.shape != q.shape or g.dtype != np.float32 or not _blas_ready(g) for g in out
    ):
        found = [(tuple(g.shape), str(g.dtype)) for g in out]
        raise ValueError(
            f"attention_backward: out must be three float32 arrays of q's shape {tuple(q.shape)} "
            f"with unit element stride, got {found}; pass views of one float32 buffer, or None"
        )


def attention_backward(go, q, k, v, o, lse, body: str | None = None, out=None):
    """Fused attention backward, recomputing probabilities block by block from `lse`.

    Shapes: go, q, k, v, o (B, NH, N, K), lse (B, NH, N) -> gq, gk, gv (B, NH, N, K)

    `out`: three arrays the gradients are written into and returned (views of one packed buffer,
    as `PackedAttention` passes); the CPU body writes them in place, the others copy.
    """
    chosen = _dispatch.pick_body("attention_backward", q, body)
    go, q, k, v, o, lse = _prepared("attention_backward", chosen, go, q, k, v, o, lse)
    if out is not None:
        _check_out(out, q)
    if chosen == "cpu":
        return _backward_cpu_body(go, q, k, v, o, lse, out)
    if chosen == "ref":
        grads = attention_backward_ref(go, q, k, v, o, lse)
    else:
        grads = _backward_gpu_body(go, q, k, v, o, lse)
    if out is None:
        return grads
    for dst, g in zip(out, grads):
        dst[...] = g
    return tuple(out)
