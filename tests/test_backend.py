"""The process-wide settings minivit makes when it is imported (backend.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Allocate 256 MiB, read glibc's mallinfo2 while it is alive and after it is freed.
PROBE = textwrap.dedent(
    """
    import ctypes, json
    import numpy as np
    import minivit.backend as backend

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    block = np.ones(64 * 2**20, np.float32)  # 256 MiB
    alive = mallinfo2()
    del block
    freed = mallinfo2()
    print(json.dumps({"tuned": backend.MALLOC_TUNED, "mmapped_alive": alive.hblkhd,
                      "heap_alive": alive.arena, "heap_freed": freed.arena,
                      "free_in_heap": freed.fordblks}))
    """
)


def _probe(**env) -> dict:
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None).mallinfo2  # noqa: B018  (glibc >= 2.33)
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2 (Linux, glibc 2.33 or newer)")
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def test_freed_memory_stays_in_the_heap_for_the_next_step():
    info = _probe(MINIVIT_MALLOC="")
    assert info["tuned"] is True
    assert info["mmapped_alive"] < 64 * 2**20  # the block came from the heap, not an mmap
    assert info["heap_alive"] >= 256 * 2**20
    assert info["heap_freed"] >= 256 * 2**20  # not trimmed back to the kernel
    assert info["free_in_heap"] >= 256 * 2**20  # and free for the next allocation


def test_minivit_malloc_system_keeps_glibc_defaults():
    info = _probe(MINIVIT_MALLOC="system")
    assert info["tuned"] is False
    assert info["mmapped_alive"] >= 256 * 2**20  # glibc's default: a large block is mmapped
    assert info["heap_freed"] < 256 * 2**20


@pytest.mark.parametrize(
    ("imports", "env", "sleeps"),
    [
        ("import minivit, numpy", {}, True),  # minivit sets the timeout before OpenBLAS loads
        ("import numpy, minivit", {}, False),  # too late: OpenBLAS already read its environment
        ("import numpy, minivit", {"OPENBLAS_THREAD_TIMEOUT": "6"}, True),  # the user's value
    ],
)
def test_openblas_threads_sleep_when_minivit_comes_first(imports, env, sleeps):
    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    report = "print(minivit.BLAS_THREADS_SLEEP, os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    code = f"{imports}, os; {report}"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    assert out.stdout.split() == [str(sleeps), env.get("OPENBLAS_THREAD_TIMEOUT", "4")]
