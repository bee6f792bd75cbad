"""The batch loader: order fixed by the seed, shards, resume, evaluation pass, shutdown."""

from __future__ import annotations

import _thread
import itertools
import threading

import numpy as np
import pytest

from minivit.data import DataError, Loader
from minivit.data.sources import ArraySource, Source

N = 20  # examples in the toy source; batches of 8 cross epoch boundaries


def _source(n: int = N) -> ArraySource:
    """Example i has label i and a random image, so batches show which examples they hold."""
    images = np.random.default_rng(0).integers(0, 256, (n, 10, 12, 3), dtype=np.uint8)
    return ArraySource(images, np.arange(n), [str(i) for i in range(n)], "toy")


def _batches(loader, count):
    return list(itertools.islice(loader, count))


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def _data_threads():
    return [t for t in threading.enumerate() if t.name.startswith("minivit-data")]


def test_training_batches_are_fixed_by_the_seed_whatever_the_worker_count():
    runs = [_batches(Loader(_source(), 8, 6, True, seed=3, workers=w), 6) for w in (0, 1, 3)]
    _assert_same(runs[0], runs[1])
    _assert_same(runs[0], runs[2])
    other = _batches(Loader(_source(), 8, 6, True, seed=4), 6)
    assert any((a[1] != b[1]).any() for a, b in zip(runs[0], other))
    x, y = runs[0][0]
    assert x.shape == (8, 6, 6, 3) and x.dtype == np.float32 and y.dtype == np.int32


def test_each_epoch_visits_every_example_once_in_a_new_order():
    labels = np.concatenate([y for _, y in _batches(Loader(_source(), 8, 4, True), 10)])  # 80
    epochs = labels.reshape(4, N)
    for epoch in epochs:
        assert sorted(epoch) == list(range(N))
    assert not (epochs[0] == epochs[1]).all()


def test_shards_of_all_ranks_make_the_single_process_batch():
    world = 4
    single = _batches(Loader(_source(), 8, 6, True, seed=1), 5)
    shards = [
        _batches(Loader(_source(), 8, 6, True, seed=1, rank=r, world=world), 5)
        for r in range(world)
    ]
    for step, (x, y) in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([s[step][0] for s in shards]), x)
        np.testing.assert_array_equal(np.concatenate([s[step][1] for s in shards]), y)


def test_resume_at_start_step_continues_the_same_stream():
    uninterrupted = _batches(Loader(_source(), 8, 6, True, seed=2), 7)
    resumed = _batches(Loader(_source(), 8, 6, True, seed=2, start_step=4), 3)
    _assert_same(uninterrupted[4:], resumed)


def test_evaluation_is_one_ordered_pass_with_a_short_last_batch():
    loader = Loader(_source(), 8, 5, False)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.arange(N))
    assert list(loader)[2][1].tolist() == [16, 17, 18, 19]  # the same again, no augmentation
    shards = [list(Loader(_source(), 8, 5, False, rank=r, world=8)) for r in range(8)]
    assert [len(s[2][1]) for s in shards] == [1, 1, 1, 1, 0, 0, 0, 0]  # every rank gets 3 batches
    np.testing.assert_array_equal(
        np.concatenate([s[step][1] for step in range(3) for s in shards]), np.arange(N)
    )


def test_breaking_out_of_the_loop_stops_the_workers():
    loader = Loader(_source(), 8, 6, True, workers=3, prefetch=2)
    for step, _ in enumerate(loader):
        if step == 2:
            break
    assert _data_threads() == []


class _Failing(Source):
    """A source whose example 5 raises `error`."""

    def __init__(self, error: BaseException):
        self.inner, self.error = _source(), error
        self.class_names, self.where = self.inner.class_names, "failing"

    def __len__(self) -> int:
        return len(self.inner)

    def get(self, i: int):
        if i == 5:
            raise self.error
        return self.inner.get(i)


@pytest.mark.parametrize("error", [ValueError("broken example"), KeyboardInterrupt()])
def test_an_error_in_a_worker_reaches_the_consumer_and_stops_the_workers(error):
    loader = Loader(_Failing(error), 4, 6, False, workers=2, prefetch=3)
    with pytest.raises(type(error)):
        for _ in loader:
            pass
    assert _data_threads() == []


class _CtrlC(_Failing):
    """A source that presses Ctrl-C (in the main thread) while a worker reads example 9."""

    def get(self, i: int):
        if i == 9:
            _thread.interrupt_main()
        return self.inner.get(i)


def test_ctrl_c_in_the_consumer_stops_the_workers():
    loader = Loader(_CtrlC(None), 4, 6, False, workers=2, prefetch=3)
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            pass
    assert _data_threads() == []


def test_a_worker_caught_before_its_thread_began_does_not_break_the_shutdown(monkeypatch):
    """A Ctrl-C inside `Thread.start()`, before the OS thread exists, leaves a thread object
    listed by `threading.enumerate()` that can never be joined: closing the loader skips it
    and still joins every worker that runs."""
    from minivit.data import loader as loader_module  # noqa: PLC0415

    monkeypatch.setattr(loader_module, "_POOLS", itertools.count(7000))  # pool "minivit-data-7000"
    stranded = threading.Thread(target=print, name="minivit-data-7000_99")  # never started
    real = threading.enumerate
    monkeypatch.setattr(threading, "enumerate", lambda: [*real(), stranded])
    loader = Loader(_CtrlC(None), 4, 6, False, workers=2, prefetch=3)
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            pass
    monkeypatch.undo()
    assert _data_threads() == []


def test_bad_loader_settings_get_one_sentence():
    with pytest.raises(
        DataError,
        match="batch size 10 does not split evenly over 4 ranks; use a multiple of 4, e.g. 8",
    ):
        Loader(_source(), 10, 6, True, world=4)
    with pytest.raises(DataError, match="rank 4 is outside 0..3"):
        Loader(_source(), 8, 6, True, rank=4, world=4)
    with pytest.raises(TypeError, match="endless"):
        len(Loader(_source(), 8, 6, True))
