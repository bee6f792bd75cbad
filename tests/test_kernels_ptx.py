"""Every GPU kernel type-checks and lowers for a real GPU: compiled to PTX through NVVM.

The simulator (test_kernels_cudasim.py) runs the kernels as Python, so it cannot catch code that
numba's CUDA compiler rejects; this test compiles each kernel for compute capability 8.0 without
a GPU. It skips when NVVM (the CUDA toolkit's compiler library) is not installed.
"""

from __future__ import annotations

import types

import pytest

pytest.importorskip("numba.cuda")

from numba import boolean, cuda, float32, float64  # noqa: E402
from numba.cuda import dispatcher  # noqa: E402

from minivit.kernels import attention, gelu, layernorm, xent  # noqa: E402

V1, V2, V3, V4 = float32[::1], float32[:, ::1], float32[:, :, ::1], float32[:, :, :, ::1]


def _kernels_and_signatures():
    ln_forward, ln_rows, ln_columns = layernorm._gpu_kernels(128)
    gelu_forward, gelu_backward = gelu._gpu_kernels()
    xent_forward, xent_backward = xent._gpu_kernels()
    attn_forward, attn_q, attn_kv = attention._gpu_kernels(64, 32, 128)
    return [
        (ln_forward, (V2, V1, V1, float64, V2, V1, V1)),
        (ln_rows, (V2, V2, V1, V1, V1, V2)),
        (ln_columns, (V2, V2, V1, V1, V1, V1)),
        (gelu_forward, (V2, V1, boolean, V2)),
        (gelu_backward, (V2, V2, V1, boolean, V2)),
        (xent_forward, (V2, V2, V1, V1)),
        (xent_backward, (V1, V2, V2, V1, V2)),
        (attn_forward, (V4, V4, V4, V4, V3)),
        (attn_q, (V4, V4, V4, V4, V4, V3, V3, V4)),
        (attn_kv, (V4, V4, V4, V4, V3, V3, V4, V4)),
    ]


def test_every_gpu_kernel_compiles_to_ptx(monkeypatch):
    # device functions ask the current GPU for its compute capability; there is none here
    fake_gpu = types.SimpleNamespace(compute_capability=(8, 0))
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: fake_gpu)
    for kernel, signature in _kernels_and_signatures():
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(8, 0))
        except Exception as error:  # NVVM missing shows up only when compiling
            if "NVVM" in type(error).__name__ or "libNVVM" in str(error):
                pytest.skip(f"NVVM not available: {error}")
            raise
        assert ".entry" in ptx and kernel.py_func.__name__ in ptx
