"""bench/_zygote.py: configurations forked from a process that has imported their framework must
report the peak memory a fresh process would, and failures must come back as errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _zygote  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "fork") and os.path.exists("/proc/self/pagemap")),
    reason="needs fork and /proc/self/pagemap (Linux)",
)

# The framework stand-in: NumPy, and a 32 MB file mapped and read through at import, like a
# shared library whose code runs once at import; the job allocates and fills 64 MB, like a
# configuration's activations, and never touches the file again.
LIBRARY_MB = 32
PRELOAD = (
    "import mmap, numpy; LIB = open(sys.argv[1], 'rb'); "
    "M = mmap.mmap(LIB.fileno(), 0, prot=mmap.PROT_READ); sum(M[::mmap.PAGESIZE])"
)
JOB = "numpy.ones(16 * 2**20, dtype=numpy.float32).sum()"
ZYGOTE = f"""
import json, sys
sys.path.insert(0, {str(BENCH)!r})
import _common, _zygote

def preload():
    global numpy, LIB, M
    {PRELOAD}

def job(request):
    if request.get("raise"):
        raise ValueError("bad configuration")
    if request.get("hang"):
        import time
        time.sleep(60)
    if request.get("print"):
        print("noise on stdout")
    if request.get("touch", True):
        _zygote.touch_pages(RUNS[0])
    {JOB}
    return {{"rss_mb": _common.peak_rss_mb()}}

RUNS = []
real_forked = _zygote.run_forked

def run_forked(runs, job, timeout_s):
    RUNS[:] = [runs]  # the job decides whether to touch (to show what not touching costs)
    return real_forked([], job, timeout_s)

_zygote.run_forked = run_forked
_zygote.serve(preload, job, timeout_s=2)
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    path = tmp_path_factory.mktemp("zygote") / "library.bin"
    path.write_bytes(os.urandom(LIBRARY_MB * 2**20))
    return path


@pytest.fixture(scope="module")
def zygote(library):
    server = _zygote.Zygote([sys.executable, "-c", ZYGOTE, str(library)])
    assert server.error is None, server.error
    yield server
    server.close()


def fresh_peak_mb(library) -> float:
    code = f"import sys\n{PRELOAD}\n{JOB}\nsys.path.insert(0, {str(BENCH)!r})\n"
    code += "import _common\nprint(_common.peak_rss_mb())"
    done = subprocess.run(
        [sys.executable, "-c", code, str(library)], capture_output=True, text=True, check=True
    )
    return float(done.stdout)


def test_forked_peak_matches_a_fresh_process(zygote, library):
    assert zygote.ready["file_pages"] * _zygote.PAGE >= LIBRARY_MB * 2**20
    fresh = fresh_peak_mb(library)
    forked = zygote.run({})["rss_mb"]
    assert abs(forked - fresh) < 0.05 * fresh + 4, (forked, fresh)
    # without reading the zygote's file pages first, the fork misses the "library"
    untouched = zygote.run({"touch": False})["rss_mb"]
    assert untouched < fresh - 0.9 * LIBRARY_MB, (untouched, fresh)


def test_resident_file_pages_lie_in_readable_file_mappings():
    with open("/proc/self/maps") as maps:
        spans = []
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and fields[1][0] == "r":
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    runs = _zygote.resident_file_pages()
    assert runs
    for address, count in runs:
        assert any(s <= address and address + count * _zygote.PAGE <= e for s, e in spans)
    assert _zygote.touch_pages(runs) == sum(count for _, count in runs)


def test_failures_come_back_as_errors_and_the_zygote_goes_on(zygote):
    assert zygote.run({"raise": True}) == {"error": "ValueError: bad configuration"}
    assert zygote.run({"hang": True}) == {"error": "timed out after 2 s"}
    assert "rss_mb" in zygote.run({"print": True})  # the child's stdout is not the protocol's


def test_a_zygote_whose_imports_fail_says_so():
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import _zygote\n"
    code += "def preload():\n    import no_such_framework\n"
    code += "_zygote.serve(preload, lambda request: {}, 5)"
    server = _zygote.Zygote([sys.executable, "-c", code])
    assert server.error == "ModuleNotFoundError: No module named 'no_such_framework'"
    server.close()


def test_step_bench_forks_and_fresh_children_agree():
    """bench/step.py's own path: ViT-Ti/16 at batch 1 in minivit, forked from its zygote and in
    a fresh interpreter; both report a step and a peak that is the model's, not the parent's."""
    import step  # noqa: PLC0415  (bench/, on the path above)

    spec = next(s for s in step.SPECS if s.label == "ViT-Ti/16")
    results = {}
    # a fresh run first: on a clean checkout it compiles minivit's kernels into Numba's cache,
    # and compiling adds tens of MB to that run's peak (301 against 246 MB)
    for fresh in (True, False, True):
        args = step.parse_args(["--frameworks", "minivit", "--budget", "0.05", "--threads", "2"])
        args.fresh = fresh
        runner = step.Runner(args.frameworks, args)
        try:
            assert runner.frameworks == ["minivit"]
            results[fresh] = runner.run("minivit", spec, "inference", 1)
        finally:
            runner.close()
    forked, alone = results[False], results[True]
    for result in (forked, alone):
        assert "error" not in result, result
        # at least one timed run: `time_steps` times a single run when the guest stalls the first
        # timed step past the 0.05 s budget (CI read 1 run here), so the count is the timer's
        assert result["iters"] >= 1 and result["img_s"] > 0 and result["gemm_gflops"] > 0
    assert abs(forked["rss_mb"] - alone["rss_mb"]) < 0.1 * alone["rss_mb"], (forked, alone)


def test_the_compile_pass_runs_forked_and_fresh():
    """`Runner.warm`: the untimed steps in a minivit child, through the zygote and through a
    fresh interpreter (`--fresh`, the `--warm` argument), each reporting what Numba compiled."""
    import step  # noqa: PLC0415

    spec = next(s for s in step.SPECS if s.label == "ViT-Ti/16")
    results = {}
    for fresh in (True, False):  # the fresh pass fills the cache on a clean checkout
        args = step.parse_args(["--frameworks", "minivit", "--threads", "2"])
        args.fresh = fresh
        runner = step.Runner(args.frameworks, args)
        try:
            results[fresh] = runner.warm(spec, [["inference", 1]])
        finally:
            runner.close()
        assert "error" not in results[fresh], results[fresh]
        assert results[fresh]["warm_s"] >= results[fresh]["numba_compile_s"] >= 0.0
    assert results[False]["numba_compiled"] == 0  # the second pass loads what the first compiled
