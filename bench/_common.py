"""Shared helpers of the benchmarks in bench/: threads, timing, memory, BLAS report, output.

Call `setup_threads(n)` before numpy, numba or torch are imported: it pins every thread pool
(OpenMP, OpenBLAS, MKL, Numba) to the same count through the environment, so minivit, NumPy and
PyTorch are timed with the same number of threads. `time_ms` reports the best of several runs
(the least disturbed by other processes on the machine).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def setup_threads(threads: int) -> None:
    """Give every thread pool `threads` threads; call before importing numpy, numba or torch."""
    already = [m for m in ("numpy", "numba", "torch") if m in sys.modules]
    if already:
        raise RuntimeError(f"setup_threads must run before importing {', '.join(already)}")
    for name in _THREAD_VARS:
        os.environ[name] = str(threads)


def load_torch(threads: int):
    """torch with `threads` intra-op threads, or None when it is not installed."""
    try:
        import torch  # noqa: PLC0415  (optional: the comparison column)
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def blas_report() -> list[str]:
    """One line per thread pool loaded in this process (BLAS kernel, version, threads)."""
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
    except ImportError:
        return ["threadpoolctl not installed: BLAS kernel unknown (pip install threadpoolctl)"]
    lines = []
    for pool in threadpool_info():
        detail = pool.get("architecture") or pool.get("threading_layer") or ""
        lines.append(
            f"{pool['user_api']}: {pool['internal_api']} {pool.get('version') or ''} "
            f"{detail}, {pool['num_threads']} threads ({os.path.basename(pool['filepath'])})"
        )
    return lines


def time_ms(fn: Callable[[], object], min_runs: int = 3, max_runs: int = 50, budget_s=0.6) -> float:
    """Best wall time of `fn()` in milliseconds, after one warm-up call.

    Runs as often as fits in `budget_s`, clamped to [min_runs, max_runs]; the best run is the one
    least disturbed by other processes and by thread pools waking up.
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = max(min_runs, min(max_runs, int(budget_s / max(first, 1e-9))))
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB: the kernel's high-water mark of this
    address space (VmHWM). Not `ru_maxrss` where /proc has it: a process started by exec also
    inherits in `ru_maxrss` the peak of the address space it replaced, which for a child that
    Python spawns with vfork is its parent's (a fresh 121 MB NumPy process read 164 MB when
    started from a test process that had reached 164)."""
    peak = _rss_kib("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak / 1024.0


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory `fn()` adds on top of what is resident when it starts, in MiB.

    Counts every allocator (NumPy, Numba's runtime, BLAS buffers), unlike tracemalloc. Resets the
    kernel's high-water mark first (Linux); elsewhere falls back to ru_maxrss, an upper bound.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # peak RSS := current RSS
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        before = 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - before) / 1024.0


def run_probe(script: str, args: Sequence[str]) -> dict:
    """Run `python script args` in a fresh process and return the JSON object it prints last."""
    done = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of `rows` with (key, heading) `columns`; floats get 2-3 decimals."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if value < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |"]
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def emit_json(rows: Sequence[dict], keys: Sequence[str]) -> None:
    """Print one JSON object per row with exactly `keys` (floats rounded to 4 decimals)."""
    for row in rows:
        record = {
            k: round(row[k], 4) if isinstance(row.get(k), float) else row.get(k) for k in keys
        }
        print(json.dumps(record), flush=True)
