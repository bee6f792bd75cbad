"""Body selection: array type, the body= argument, MINIVIT_KERNEL_BODY, and bad choices."""

from __future__ import annotations

import numpy as np
import pytest

from minivit.kernels import _dispatch, bias, layernorm, layernorm_forward


class _FakeGpuArray:
    """Anything exposing __cuda_array_interface__ that is not a CuPy array counts as host."""

    __cuda_array_interface__ = {}


def test_numpy_arrays_get_the_cpu_body(monkeypatch):
    monkeypatch.delenv(_dispatch.BODY_ENV, raising=False)
    assert _dispatch.pick_body("k", np.zeros(2), None) == "cpu"
    assert _dispatch.pick_body("k", _FakeGpuArray(), None) == "cpu"


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(_dispatch.BODY_ENV, "ref")
    assert _dispatch.pick_body("k", np.zeros(2), None) == "ref"
    assert _dispatch.pick_body("k", np.zeros(2), "cpu") == "cpu"


def test_environment_routes_the_public_function(monkeypatch):
    calls = []
    monkeypatch.setattr(layernorm, "layernorm_forward_ref", lambda *a: calls.append(a) or a)
    monkeypatch.setenv(_dispatch.BODY_ENV, "ref")
    layernorm_forward(np.ones((2, 3), np.float32), np.ones(3), np.zeros(3))
    assert len(calls) == 1


def test_environment_is_read_afresh_on_every_call(monkeypatch):
    """pick_body reads os.environ's own dict; a change made at run time shows at once, an empty
    value counts as unset, and a mapping without that dict is read the plain way."""
    array = np.zeros(2)
    for value, body in [("ref", "ref"), ("", "cpu"), ("cpu", "cpu"), ("ref", "ref")]:
        monkeypatch.setenv(_dispatch.BODY_ENV, value)
        assert _dispatch.pick_body("k", array, None) == body
    monkeypatch.delenv(_dispatch.BODY_ENV)
    assert _dispatch.pick_body("k", array, None) == "cpu"
    monkeypatch.setattr(_dispatch.os, "environ", {_dispatch.BODY_ENV: "ref"})
    assert _dispatch.pick_body("k", array, None) == "ref"


@pytest.mark.parametrize("bad", ["numba", "CPU", "cuda"])
def test_unknown_body_is_one_clear_sentence(monkeypatch, bad):
    monkeypatch.delenv(_dispatch.BODY_ENV, raising=False)
    with pytest.raises(ValueError, match="use one of ref, cpu, gpu"):
        _dispatch.pick_body("layernorm_forward", np.zeros(2), bad)
    monkeypatch.setenv(_dispatch.BODY_ENV, bad)
    with pytest.raises(ValueError, match=r"\$MINIVIT_KERNEL_BODY"):
        _dispatch.pick_body("layernorm_forward", np.zeros(2), None)


def test_cpu_kernel_runs_small_work_on_the_calling_thread(monkeypatch):
    """Below SERIAL_BELOW elements the serial twin runs; both twins give the same bits."""
    kernel = bias._bias_grad_cpu
    assert kernel.threaded.targetoptions.get("parallel") is True
    assert not kernel.serial.targetoptions.get("parallel")
    assert kernel.serial.py_func.__qualname__ != kernel.threaded.py_func.__qualname__  # own cache
    monkeypatch.setattr(_dispatch, "SERIAL_BELOW", 100)
    assert kernel.body(99) is kernel.serial and kernel.body(100) is kernel.threaded
    g = np.random.default_rng(0).standard_normal((300, 7), dtype=np.float32)
    totals_serial, totals_threaded = np.zeros((2, 7)), np.zeros((2, 7))
    kernel.serial(g, 2, totals_serial)
    kernel.threaded(g, 2, totals_threaded)
    np.testing.assert_array_equal(totals_serial, totals_threaded)
    want = g.sum(axis=0, dtype=np.float64)
    np.testing.assert_allclose(totals_serial.sum(axis=0), want, rtol=1e-5, atol=1e-4)


def test_cache_files_go_when_a_source_of_the_package_changes(tmp_path):
    (tmp_path / "helpers.py").write_text("SCALE = 1\n")
    (tmp_path / "body.py").write_text("from helpers import SCALE\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    built = [cache / "body._cpu-3.py311.nbi", cache / "body._cpu-3.py311.1.nbc"]
    kept = cache / "body.cpython-311.pyc"  # Python's own cache stays
    for path in (*built, kept):
        path.write_bytes(b"x")
    assert _dispatch.drop_stale_cache(tmp_path)  # no stamp yet: the files cannot be trusted
    assert not any(p.exists() for p in built) and kept.exists()
    for path in built:
        path.write_bytes(b"x")  # Numba writes them again
    assert not _dispatch.drop_stale_cache(tmp_path)  # sources unchanged: the cache stays
    assert all(p.exists() for p in built)
    (tmp_path / "helpers.py").write_text("SCALE = 2\n")  # only the inlined helper changed
    assert _dispatch.drop_stale_cache(tmp_path)
    assert not any(p.exists() for p in built)
    assert not _dispatch.drop_stale_cache(tmp_path)


def test_a_read_only_package_keeps_its_cache_untouched(tmp_path):
    (tmp_path / "body.py").write_text("x = 1\n")
    (tmp_path / "__pycache__").write_text("not a directory")  # cannot hold a stamp
    assert not _dispatch.drop_stale_cache(tmp_path)
