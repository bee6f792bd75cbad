"""GPU bodies against the NumPy references under Numba's CUDA simulator (no GPU needed).

The simulator must be switched on before numba.cuda is first imported, so the checks run in a
child process started with NUMBA_ENABLE_CUDASIM=1 (this file, run as a script). The simulator
runs every GPU thread as a Python thread, so shapes are tiny and block sizes are patched small;
they are still odd and smaller than, equal to and larger than one block or tile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def assert_matches(got, ref, rtol=1e-5, scale=0.0):
    """Agreement to `rtol` relative to the reference's largest magnitude (or `scale`)."""
    atol = rtol * max(float(np.abs(ref).max()), scale)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


def _check_layernorm(rng):
    from minivit.kernels import layernorm_backward, layernorm_forward, layernorm_forward_ref

    for shape in [(1, 5), (3, 10), (2, 4)]:
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        scale, bias = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(2))
        gy = rng.standard_normal(shape).astype(np.float32)
        ref = layernorm_forward_ref(x, scale, bias)
        for g, r in zip(layernorm_forward(x, scale, bias, body="gpu"), ref):
            assert_matches(g, r)
        got = layernorm_backward(gy, x, ref[1], ref[2], scale, body="gpu")
        for g, r in zip(got, layernorm_backward(gy, x, ref[1], ref[2], scale, body="ref")):
            assert_matches(g, r)


def _check_gelu(rng):
    from minivit.kernels import gelu_backward, gelu_forward

    x = (rng.standard_normal((3, 7)) * 3).astype(np.float32)
    bias = rng.standard_normal(7).astype(np.float32)
    gy = rng.standard_normal((3, 7)).astype(np.float32)
    for approximate in (True, False):
        for b in (bias, None):
            want = gelu_forward(x, b, approximate, body="ref")
            assert_matches(gelu_forward(x, b, approximate, body="gpu"), want)
            want = gelu_backward(gy, x, b, approximate, body="ref")
            assert_matches(gelu_backward(gy, x, b, approximate, body="gpu"), want)


def _check_xent(rng):
    from minivit.kernels import softmax_xent_backward, softmax_xent_forward

    z = (rng.standard_normal((5, 6)) * 3).astype(np.float32)
    y = np.eye(6, dtype=np.float32)[[0, 5, 2, 2, 1]]
    g = rng.standard_normal(5).astype(np.float32)
    ref = softmax_xent_forward(z, y, body="ref")
    for a, b in zip(softmax_xent_forward(z, y, body="gpu"), ref):
        assert_matches(a, b)
    want = softmax_xent_backward(g, z, y, ref[1], body="ref")
    assert_matches(softmax_xent_backward(g, z, y, ref[1], body="gpu"), want)


def _check_attention(rng):
    from minivit.kernels import attention_backward, attention_forward

    for shape in [(1, 2, 5, 8), (2, 1, 7, 3), (1, 1, 1, 4)]:
        q, k, v, go = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
        o, lse = attention_forward(q, k, v, body="gpu")
        ref_o, ref_lse = attention_forward(q, k, v, body="ref")
        assert_matches(o, ref_o)
        assert_matches(lse, ref_lse)
        refs = attention_backward(go, q, k, v, ref_o, ref_lse, body="ref")
        for g, r in zip(attention_backward(go, q, k, v, o, lse, body="gpu"), refs):
            assert_matches(g, r, scale=float(np.abs(refs[2]).max()))
        packed = np.zeros(
            (shape[0], shape[2], 3, shape[1], shape[3]), np.float32
        )  # PackedAttention
        out = tuple(packed[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        attention_backward(go, q, k, v, o, lse, body="gpu", out=out)
        for g, r in zip(out, refs):
            assert_matches(g, r, scale=float(np.abs(refs[2]).max()))


def _run_checks() -> None:
    """Shrink the launch constants, then check every GPU body (runs inside the simulator)."""
    from minivit.kernels import attention, gelu, layernorm, xent

    layernorm.GPU_THREADS, layernorm.GPU_COLUMN_THREADS = 4, 4
    gelu.GPU_THREADS = 8
    xent.GPU_THREADS = 2
    attention.GPU_ROWS, attention.GPU_TILE, attention.GPU_MAX_HEAD = 4, 3, 8
    rng = np.random.default_rng(0)
    for check in (_check_layernorm, _check_gelu, _check_xent, _check_attention):
        check(rng)
        print(f"{check.__name__}: ok", flush=True)


def test_gpu_bodies_match_references_in_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": ok") == 4, done.stdout


if __name__ == "__main__":
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run through pytest, not directly"
    _run_checks()
