"""kernels.matmul against NumPy's `@`, on strided, transposed and awkward operands, and the
choice of BLAS library in kernels._blas."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from minivit import backend, kernels
from minivit.kernels import _blas, gemm


def _operands(rng, m, k, n):
    return rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), np.float32)


def _close(got, want):
    """float32 products against float64 ones, to a float32 rounding of the largest entry."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (1, 64, 7), (33, 1, 5), (197, 192, 768), (5, 3, 1)])
def test_plain_products_match_numpy(m, k, n):
    a, b = _operands(np.random.default_rng(m * k * n), m, k, n)
    got = kernels.matmul(a, b)
    assert got.dtype == np.float32 and got.shape == (m, n)
    _close(got, a.astype(np.float64) @ b.astype(np.float64))


def _views(rng):
    """(a, b) pairs whose layouts take every branch of gemm._block."""
    a, b = _operands(rng, 40, 24, 16)
    wide = rng.standard_normal((40, 50), dtype=np.float32)
    yield a, b  # both row-major
    yield np.asfortranarray(a), b  # a transposed in memory: read as T
    yield a, np.asfortranarray(b)
    yield b.T.copy().T[:, :16], a[:16].T.copy().T  # F-ordered blocks
    yield wide[:, 3:27], b  # a block of columns: row stride 50, not 24
    yield a[5:29].T, wide[5:29, :9]  # a transposed row block, b a column block
    yield a[:, ::2], b[::2]  # strided columns: copied
    yield a[::-1], b[::-1]  # negative strides: copied


@pytest.mark.parametrize("case", range(8))
def test_strided_and_transposed_operands(case):
    a, b = list(_views(np.random.default_rng(1)))[case]
    _close(kernels.matmul(a, b), a.astype(np.float64) @ b.astype(np.float64))


def test_out_and_accumulate_write_in_place():
    rng = np.random.default_rng(2)
    a, b = _operands(rng, 30, 20, 10)
    start = rng.standard_normal((30, 10), dtype=np.float32)
    out = start.copy()
    got = kernels.matmul(a, b, out=out, accumulate=True)
    assert got is out
    _close(out, start + a.astype(np.float64) @ b)
    again = kernels.matmul(a.T.T, b, out=out)
    assert again is out
    _close(out, a.astype(np.float64) @ b)


def test_other_dtypes_and_empty_axes_take_numpy():
    rng = np.random.default_rng(3)
    a, b = _operands(rng, 6, 4, 3)
    got = kernels.matmul(a.astype(np.float64), b.astype(np.float64))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, a.astype(np.float64) @ b.astype(np.float64))
    assert kernels.matmul(np.ones((0, 4), np.float32), b).shape == (0, 3)
    np.testing.assert_array_equal(kernels.matmul(np.ones((6, 0), np.float32), b[:0]), 0)


@pytest.mark.parametrize("case", range(8))
def test_sgemm_body_on_every_layout_matches_float64(case):
    """body="cpu" runs the sgemm call on whichever library is bound (by default only MKL's)."""
    a, b = list(_views(np.random.default_rng(4)))[case]
    assert gemm._cpu_ready(a, b) and not gemm._cpu_ready(a.astype(np.float64), b)
    got = kernels.matmul(a, b, body="cpu")
    assert not np.shares_memory(got, a)
    _close(got, a.astype(np.float64) @ b.astype(np.float64))
    out = np.ones((a.shape[0], b.shape[1]), np.float32)
    assert kernels.matmul(a, b, out=out, accumulate=True, body="cpu") is out
    _close(out, 1.0 + a.astype(np.float64) @ b.astype(np.float64))


def _split_case(rng, m, k, n, trans_a, trans_b):
    """Operands laid out as `_sgemm_split` reads them, and the float64 product."""
    a, b = _operands(rng, m, k, n)
    want = a.astype(np.float64) @ b.astype(np.float64)
    ab = np.ascontiguousarray(a.T) if trans_a else a  # stored (K, M), read as its transpose
    bb = np.ascontiguousarray(b.T) if trans_b else b
    flags = (_blas.T if trans_a else _blas.N, _blas.T if trans_b else _blas.N)
    return flags, ab, bb, want


@pytest.mark.parametrize("by_rows", [True, False])
@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("m, k, n, parts", [(197, 64, 200, 2), (7, 5, 40, 3), (33, 17, 15, 2)])
def test_split_body_matches_float64_on_every_layout(m, k, n, parts, trans_a, trans_b, by_rows):
    """Every block of rows or columns, including empty and ragged ones (n below parts x 16)."""
    rng = np.random.default_rng(m + k + n + parts)
    (ta, tb), ab, bb, want = _split_case(rng, m, k, n, trans_a, trans_b)
    c = np.full((m, n), np.nan, np.float32)
    gemm._sgemm_split(ta, tb, ab, bb, np.float32(0), c, parts, by_rows, gemm._NO_BIAS)
    _close(c, want)
    start = rng.standard_normal((m, n), dtype=np.float32)
    c = start.copy()
    gemm._sgemm_split(ta, tb, ab, bb, np.float32(1), c, parts, by_rows, gemm._NO_BIAS)
    _close(c, start + want)  # accumulated
    bias = rng.standard_normal(n, dtype=np.float32)
    c = np.full((m, n), np.nan, np.float32)  # every entry written: each block takes its bias
    gemm._sgemm_split(ta, tb, ab, bb, np.float32(0), c, parts, by_rows, bias)
    _close(c, want + bias)


@pytest.mark.parametrize("m, k, n", [(197, 384, 1152), (6304 // 8, 64, 96), (3, 5, 7), (1, 4, 40)])
@pytest.mark.parametrize("body", [None, "cpu", "ref"])
def test_bias_is_added_to_every_row(m, k, n, body):
    """kernels.matmul(..., bias=) against the float64 product plus the bias, on each body: the
    threaded split (both cuts), the one-call body and NumPy's, into out and fresh arrays."""
    rng = np.random.default_rng(m + n)
    a, b = _operands(rng, m, k, n)
    bias = rng.standard_normal(n, dtype=np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64) + bias
    _close(kernels.matmul(a, b, bias=bias, body=body), want)
    out = np.full((m, n), np.nan, np.float32)
    assert kernels.matmul(a.T.copy().T, b, out=out, bias=bias, body=body) is out
    _close(out, want)
    start = rng.standard_normal((m, n), dtype=np.float32)
    out = start.copy()
    kernels.matmul(a, b, out=out, accumulate=True, bias=bias, body=body)
    _close(out, start + want)


def test_bias_of_another_dtype_or_layout_and_the_wrong_shape():
    rng = np.random.default_rng(8)
    a, b = _operands(rng, 197, 64, 48)
    wide = rng.standard_normal(96, dtype=np.float32)
    want = a.astype(np.float64) @ b
    _close(kernels.matmul(a, b, bias=wide[::2]), want + wide[::2])  # strided: NumPy's body
    _close(kernels.matmul(a, b, bias=wide[:48].astype(np.float64)), want + wide[:48])
    with pytest.raises(ValueError, match=r"bias has shape \(96,\); it must be \(48,\)"):
        kernels.matmul(a, b, bias=wide)


def test_split_plan_cuts_the_longer_side_and_keeps_small_products_whole():
    assert gemm.split_plan(1, 1000, 384, 2) == (1, True)  # a batch-1 head: one call
    assert gemm.split_plan(197, 1152, 384, 2) == (2, False)  # batch-1 tokens: column blocks
    assert gemm.split_plan(6304, 384, 1536, 2) == (2, True)  # batch 32: row blocks
    assert gemm.split_plan(384, 1536, 6304, 4) == (4, False)  # a weight gradient
    assert gemm.split_plan(2048, 20, 4096, 2) == (2, True)
    assert gemm.split_plan(20, 2048, 4096, 8) == (8, False)
    assert gemm.split_plan(4096, 4096, 1, 1) == (1, True)  # one thread: one call
    assert gemm.split_plan(3, 3, 1 << 20, 8) == (3, True)  # no more blocks than rows
    assert gemm.split_plan(1, 40, 1 << 20, 8) == (2, False)  # or 16-wide column blocks
    m, n, k = 197, 384, 384
    assert m * n * k >= gemm.SPLIT_ABOVE and gemm.split_plan(m, n, k, 2)[0] == 2


def test_default_products_use_the_split_body_where_openblas_is_its_own(monkeypatch):
    """With the kernels' OpenBLAS single-threaded and separate from NumPy's, a large product
    takes `_sgemm_split`, a small one `_sgemm_cpu`; elsewhere the bodies are not both used."""
    calls = []
    for name in ("_sgemm_split", "_sgemm_cpu"):
        real = getattr(gemm, name)
        monkeypatch.setattr(gemm, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a)))
    a, b = _operands(np.random.default_rng(6), 197, 384, 400)
    _close(kernels.matmul(a, b), a.astype(np.float64) @ b)
    _close(kernels.matmul(a[:2, :8], b[:8, :3]), a[:2, :8].astype(np.float64) @ b[:8, :3])
    if _blas.LIBRARY == "openblas" and not _blas.products_on_numpy_threads():
        want = ["_sgemm_split", "_sgemm_cpu"] if backend.num_threads() > 1 else ["_sgemm_cpu"] * 2
        assert calls == want
    elif _blas.LIBRARY == "mkl":
        assert calls == ["_sgemm_cpu", "_sgemm_cpu"]
    else:
        assert calls == []


def test_numpy_blas_limit_leaves_the_kernels_copy_at_one_thread():
    limit = _blas.limit_numpy_blas(2)
    if limit is None:
        pytest.skip("threadpoolctl is not installed")
    with limit:
        if _blas._KERNEL_BLAS is not None:
            assert _blas.kernel_blas_single() and not _blas.products_on_numpy_threads()
        others = [p for p in _blas_threads() if p != _blas._blas_library_path()]
        assert all(_blas_threads()[p] == 2 for p in others)


def test_bad_shapes_get_one_sentence():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="cannot multiply shapes"):
        kernels.matmul(a, a)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        kernels.matmul(a, a.T, accumulate=True)
    with pytest.raises(ValueError, match="out has shape"):
        kernels.matmul(a, a.T, out=np.empty((3, 4), np.float32))


def _library_in_child(**env) -> subprocess.CompletedProcess:
    code = "from minivit.kernels import _blas; print(_blas.LIBRARY)"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_environment_chooses_openblas_and_rejects_unknown_names():
    """The choice is read when the kernels load; a bad name fails there in one sentence."""
    done = _library_in_child(MINIVIT_BLAS="openblas")
    assert done.returncode == 0 and done.stdout.strip() == "openblas"
    bad = _library_in_child(MINIVIT_BLAS="atlas")
    assert bad.returncode != 0
    assert "MINIVIT_BLAS='atlas' is not a BLAS library; use mkl or openblas" in bad.stderr


def test_without_mkl_openblas_is_bound_and_asking_for_mkl_says_how(monkeypatch):
    monkeypatch.delenv(backend.BLAS_ENV, raising=False)
    monkeypatch.setattr(backend, "find_mkl", lambda: None)
    monkeypatch.setattr(backend, "cpu_vendor", lambda: "GenuineIntel")
    assert _blas._choose()[0] == "openblas"
    monkeypatch.setenv(backend.BLAS_ENV, "mkl")
    with pytest.raises(RuntimeError, match=r"pip install 'minivit\[mkl\]' or unset MINIVIT_BLAS"):
        _blas._choose()


@pytest.mark.skipif(backend.find_mkl() is None, reason="MKL is not installed (minivit[mkl])")
def test_installed_mkl_is_bound_on_intel_cpus_only(monkeypatch):
    monkeypatch.delenv(backend.BLAS_ENV, raising=False)
    monkeypatch.setattr(backend, "cpu_vendor", lambda: "AuthenticAMD")
    assert _blas._choose()[0] == "openblas"
    monkeypatch.setattr(backend, "cpu_vendor", lambda: "GenuineIntel")
    library, address = _blas._choose()
    assert library == "mkl" and address > 0


def _policy_after_import(**env) -> str:
    code = (
        "import os, minivit.kernels; from minivit.kernels import _blas; "
        "print(os.environ.get('OMP_WAIT_POLICY', 'unset'), _blas.products_on_numpy_threads())"
    )
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_openmp_threads_sleep_only_where_numpy_threads_run_the_products():
    """The policy is set when the kernels load: PASSIVE only for NumPy's threaded OpenBLAS."""
    policy, on_numpy = _policy_after_import(MINIVIT_BLAS="openblas").split()
    assert policy == ("PASSIVE" if on_numpy == "True" else "unset")
    kept = _policy_after_import(MINIVIT_BLAS="openblas", OMP_WAIT_POLICY="ACTIVE")
    assert kept.split()[0] == "ACTIVE"
    if backend.find_mkl() is not None:
        assert _policy_after_import(MINIVIT_BLAS="mkl") == "unset False"


def test_wait_policy_is_passive_exactly_when_asked(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    backend.openmp_wait_policy(products_on_numpy_threads=False)
    assert "OMP_WAIT_POLICY" not in os.environ
    backend.openmp_wait_policy(products_on_numpy_threads=True)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    backend.openmp_wait_policy(products_on_numpy_threads=True)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def _blas_threads() -> dict:
    from threadpoolctl import threadpool_info  # noqa: PLC0415

    return {
        os.path.realpath(i["filepath"]): i["num_threads"]
        for i in threadpool_info()
        if i["user_api"] == "blas"
    }


def test_library_of_an_address_names_its_shared_object():
    import ctypes  # noqa: PLC0415

    libc = ctypes.CDLL(None)
    path = _blas._library_of(ctypes.cast(libc.printf, ctypes.c_void_p).value)
    assert path is not None and "libc" in os.path.basename(path)
    assert _blas._library_of(0) is None


def test_kernel_blas_is_pinned_to_one_thread_or_limited_around_each_call():
    """Where the kernels' sgemm is an OpenBLAS of its own, it runs one thread for good and the
    per-call limit touches nothing; otherwise the limit sets every BLAS to one thread and
    restores it."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    from minivit.kernels import _dispatch  # noqa: PLC0415

    before = _blas_threads()
    with _dispatch.blas_single_thread():
        inside = _blas_threads()
    assert _blas_threads() == before
    if _blas.kernel_blas_single():
        own = _blas._blas_library_path()
        assert before[own] == 1 and inside == before
        assert any(n == backend.num_threads() for p, n in before.items() if p != own)
        with threadpool_limits(limits=2, user_api="blas"):  # a caller raised it: toggle again
            assert not _blas.kernel_blas_single()
            with _dispatch.blas_single_thread():
                assert _blas_threads()[own] == 1
        assert _blas.kernel_blas_single()
    else:  # every BLAS the limit controls (those loaded when it was built) runs one thread
        with _dispatch.blas_single_thread():
            limited = _blas.controller().info()
        assert {lib["num_threads"] for lib in limited if lib["user_api"] == "blas"} == {1}


def test_the_scipy_openblas32_wheel_is_bound_and_pinned_where_installed():
    """With the wheel installed and OpenBLAS chosen, the kernels' sgemm is the wheel's library,
    a library of its own (not SciPy's copy, not NumPy's), run on one thread."""
    wheel = _blas.wheel_openblas()
    if wheel is None or _blas.LIBRARY != "openblas":
        pytest.skip("the scipy-openblas32 wheel is not installed, or MKL is bound")
    assert _blas._blas_library_path() == os.path.realpath(wheel)
    assert _blas.kernel_blas_single()
    assert os.path.realpath(wheel) in _blas_threads()
    version = _blas._KERNEL_BLAS.version  # reports say which build ran the products
    assert f"openblas {version}, one block per Numba thread" == _blas.products_description()


def _fake_wheel(root, library_bytes: bytes | None, monkeypatch):
    """A `scipy_openblas32` package under `root`, first on the import path, whose lib/ holds
    `library_bytes` as its library (none when None) and whose __init__ raises if imported."""
    import importlib  # noqa: PLC0415

    package = root / "scipy_openblas32"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    if library_bytes is not None:
        (package / "lib" / "libscipy_openblas.so").write_bytes(library_bytes)
    monkeypatch.delitem(sys.modules, "scipy_openblas32", raising=False)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return package


def test_wheel_library_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = _fake_wheel(tmp_path, b"not a shared library", monkeypatch)
    assert _blas.wheel_openblas() == package / "lib" / "libscipy_openblas.so"


def test_a_missing_or_broken_wheel_falls_back_to_scipys_openblas(tmp_path, monkeypatch):
    from numba.extending import get_cython_function_address  # noqa: PLC0415

    scipys = get_cython_function_address("scipy.linalg.cython_blas", "sgemm")
    monkeypatch.setattr(_blas, "wheel_openblas", lambda: None)
    assert _blas._openblas_sgemm() == scipys
    broken = tmp_path / "libscipy_openblas.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(_blas, "wheel_openblas", lambda: broken)
    assert _blas._openblas_sgemm() == scipys


def test_a_package_without_its_library_is_no_wheel(tmp_path, monkeypatch):
    _fake_wheel(tmp_path, None, monkeypatch)
    assert _blas.wheel_openblas() is None
