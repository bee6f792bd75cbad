"""bench/step.py's timing plan and its account of where the wall time goes, on a fake clock."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import step  # noqa: E402


class FakeClock:
    """time.perf_counter for the bench: moves only when a fake step (or setup) advances it."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(step.time, "perf_counter", fake)
    return fake


def stepping(clock, seconds: list[float]):
    """A step whose n-th call takes seconds[n] on the fake clock (the last value repeats)."""
    calls = []

    def run():
        clock.now += seconds[min(len(calls), len(seconds) - 1)]
        calls.append(clock.now)

    return run, calls


def test_short_steps_fill_the_budget_and_phases_add_up(clock):
    phases = step.Phases()
    clock.now += 0.7  # model and data
    run, calls = stepping(clock, [0.5, 0.2, 0.3, 0.2])
    seconds, iters = step.time_steps(run, 1, 2.0, 2, 10, phases)
    assert iters == 4  # int(2.0 / 0.5): the warm-up step sets the count
    assert len(calls) == 5
    assert seconds == pytest.approx(0.2)  # median of 0.2, 0.3, 0.2, 0.2
    assert phases.seconds == pytest.approx({"setup": 0.7, "warm-up": 0.5, "timed": 0.9})


def test_a_warm_up_longer_than_the_budget_is_timed_once(clock):
    run, calls = stepping(clock, [2.5, 2.4])
    seconds, iters = step.time_steps(run, 1, 2.0, 2, 10)
    assert (seconds, iters, len(calls)) == (pytest.approx(2.4), 1, 2)


def test_time_lines_sum_the_children_phases():
    details = {
        "minivit": [
            {"child_s": 10.0, "phases": {"setup": 1.0, "warm-up": 3.0, "timed": 4.0}},
            {"child_s": 5.0, "phases": {"setup": 0.5, "warm-up": 1.0, "timed": 2.0}},
        ],
        "torch": [{"error": "boom", "child_s": 2.0}],
    }
    (line,) = step.time_lines(details, 20.0)
    assert line == (
        "wall time 20 s: 17 s in configurations (setup 2 s, warm-up 4 s, timed 6 s; 6 s to start,"
        " touch pages and exit), 3 s in this process and zygotes"
    )
