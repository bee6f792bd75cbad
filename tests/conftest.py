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
