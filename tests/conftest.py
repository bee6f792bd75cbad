"""Shared test fixtures: where the golden reference data lives."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GOLDEN_TINY = TESTS / "data" / "golden"  # copied from ../shared/golden/tiny, carried by the repo
GOLDEN_FULL = TESTS.parent.parent / "shared" / "golden" / "full"  # read in place when present


@pytest.fixture
def golden_tiny() -> Path:
    return GOLDEN_TINY


@pytest.fixture
def golden_full() -> Path:
    if not GOLDEN_FULL.is_dir():
        pytest.skip(f"large golden fixtures not found at {GOLDEN_FULL}")
    return GOLDEN_FULL


@pytest.fixture(params=["threaded", "serial"])
def each_cpu_body(request, monkeypatch):
    """Run a test once with every `CpuKernel` on its threaded body and once on its serial one
    (by default the size of the work picks: `_dispatch.SERIAL_BELOW`)."""
    from minivit.kernels import _dispatch  # noqa: PLC0415

    monkeypatch.setattr(_dispatch, "SERIAL_BELOW", 0 if request.param == "threaded" else 1 << 62)
    return request.param
