"""Fork server for the benchmarks: import a framework once, run each configuration in a fork.

A fresh interpreter per configuration makes each configuration's peak resident memory its own,
but on 2 cores the imports cost more than many of the measurements: torch with timm takes about
6 s per process, JAX with Flax 2 s, minivit 1 s, and the whole-step table has 16 configurations
per framework. A zygote process imports the framework once and forks one child per
configuration; the child runs it and exits, so each configuration still runs alone in its own
process and the zygote stays as it was after the imports.

Memory: a forked child's peak resident set counts the anonymous pages it inherits (their page tables
are copied at fork) but not the pages of shared libraries and other mapped files that the zygote
had faulted in (Linux maps those into the child only when the child touches them). A child that
never executes most of libtorch would read hundreds of MB lower than a fresh process that
imported the same modules (timm ViT-S/16 at batch 1: 531 MB forked against 818 MB fresh). So
the zygote lists its resident file-backed pages from /proc/self/pagemap after importing, and
each child reads one byte of each of them first: its resident set then starts where a fresh
process's does after the same imports (`tests/test_bench_zygote.py` checks both against each
other).

Protocol: the zygote prints one JSON line when it is ready (or {"error": ...} when an import
failed), then reads one JSON request per line on stdin and prints one JSON result per line.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_file_pages() -> list[tuple[int, int]]:
    """Runs of pages of readable file mappings that are resident in this process: (address,
    count) pairs. Empty where /proc/self/pagemap cannot be read (not Linux)."""
    runs: list[tuple[int, int]] = []
    try:
        maps = open("/proc/self/maps")  # noqa: SIM115  (closed below, with pagemap)
        pagemap = open("/proc/self/pagemap", "rb")  # noqa: SIM115
    except OSError:
        return runs
    with maps, pagemap:
        for line in maps.read().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith("/") or fields[1][0] != "r":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(start // PAGE * 8)
            entries = memoryview(pagemap.read((end - start) // PAGE * 8)).cast("Q")
            run_start, run_len = 0, 0
            for i, entry in enumerate(entries):
                if entry >> 63:  # bit 63: page present
                    if run_len and run_start + run_len == i:
                        run_len += 1
                        continue
                    if run_len:
                        runs.append((start + run_start * PAGE, run_len))
                    run_start, run_len = i, 1
            if run_len:
                runs.append((start + run_start * PAGE, run_len))
    return runs


def touch_pages(runs: Sequence[tuple[int, int]]) -> int:
    """Read one byte of every page in `runs`, mapping each into this process; returns the pages
    read. Nothing is copied: a strided view of the run is summed in place."""
    pages = 0
    for address, count in runs:
        view = (ctypes.c_ubyte * (count * PAGE)).from_address(address)
        sum(memoryview(view).cast("B")[::PAGE])  # the read is what maps each page
        pages += count
    return pages


def _last_line(path: str) -> str:
    with open(path, errors="replace") as err:
        lines = [line for line in err.read().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def run_forked(runs: Sequence[tuple[int, int]], job: Callable[[], dict], timeout_s: int) -> dict:
    """`job()` in a forked child (after `touch_pages(runs)`); its result dict, or {"error": ...}
    when it raised, crashed or ran past `timeout_s` (SIGALRM ends it)."""
    read_fd, write_fd = os.pipe()
    err = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115
    err.close()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_fd)
            with open(err.name, "w") as log:  # its prints must not reach the protocol pipe
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
            signal.alarm(timeout_s)
            touch_pages(runs)
            result = job()
        except BaseException as exc:  # noqa: BLE001  (reported to the parent, then exit)
            traceback.print_exc()
            result, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        try:
            with os.fdopen(write_fd, "w") as out:
                out.write(json.dumps(result))
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as out:
        text = out.read()
    _, status = os.waitpid(pid, 0)
    try:
        if text:
            return json.loads(text)
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            if signum == signal.SIGALRM:
                return {"error": f"timed out after {timeout_s} s"}
            return {"error": f"killed by {signal.Signals(signum).name}: {_last_line(err.name)}"}
        return {"error": f"exit status {os.WEXITSTATUS(status)}: {_last_line(err.name)}"}
    finally:
        os.unlink(err.name)


def serve(preload: Callable[[], None], job: Callable[[dict], dict], timeout_s: int) -> None:
    """The zygote's main loop: `preload()`, then one forked `job(request)` per stdin line."""
    try:
        preload()
    except Exception as exc:  # noqa: BLE001  (an optional framework that is not installed)
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return
    runs = resident_file_pages()
    print(json.dumps({"ready": True, "file_pages": sum(n for _, n in runs)}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip():
                request = json.loads(line)
                result = run_forked(runs, lambda r=request: job(r), timeout_s)
                print(json.dumps(result), flush=True)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        return


class Zygote:
    """The parent's handle on one zygote process: `command` runs `serve(...)`."""

    def __init__(self, command: Sequence[str]):
        self.process = subprocess.Popen(
            list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        first = self.process.stdout.readline()
        self.ready = json.loads(first) if first else {"error": "the zygote exited at start"}
        self.error = self.ready.get("error")

    def run(self, request: dict) -> dict:
        """One configuration in a fresh fork of the zygote; its result dict."""
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        return json.loads(line) if line else {"error": "the zygote exited"}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
