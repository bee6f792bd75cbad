"""Batches of preprocessed examples, made ahead of time by worker threads.

Training reads an endless stream: epoch `e` is a permutation of the source drawn from
`(seed, e)`, epochs follow each other without a gap, and global step `s` takes stream positions
`[s * batch_size, (s + 1) * batch_size)`. Rank `r` of `world` takes its own contiguous slice of
that global batch, so what a step sees does not depend on the number of ranks, and resuming at
`start_step` continues exactly where a run stopped. Each example's augmentation draws from its
own generator seeded by `(seed, epoch, index)`, so batches do not depend on the number of workers
either. (The official pipeline shuffles with a `shuffle_buffer`; a full permutation per epoch is
the limit of a large buffer and is what makes the stream reproducible from a step number.)

Evaluation makes one ordered pass over every example; the last global batch may be short, and a
rank whose slice of it is empty still gets an empty batch so collective calls stay in step.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minivit.data.errors import DataError
from minivit.data.preprocess import eval_transform, train_transform
from minivit.data.sources import Source

_POOLS = itertools.count()  # numbers each loader's pool, so its threads can be told apart


class Loader:
    """Iterable of `(images, labels)` batches for one rank.

    Shapes: images (b, S, S, 3) float32 in [-1, 1], labels (b,) int32;
        b = batch_size / world (train), at most that (eval).

    Args:
        source: where the examples come from.
        batch_size: the GLOBAL batch, summed over all ranks; must be divisible by `world`.
        image_size: S, the side of the square images.
        train: official augmentation and an endless shuffled stream if True; else one ordered
            pass with the evaluation resize.
        seed: fixes the shuffling and every augmentation.
        rank, world: this process's place among `world` data-parallel ranks.
        start_step: global step of the first batch (resume).
        workers: threads that build batches (0: build them in the caller's thread).
        prefetch: batches made ahead of the one being consumed (the bound of the queue).
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        image_size: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
        workers: int = 2,
        prefetch: int = 4,
    ):
        if len(source) == 0:
            raise DataError(f"{source.where} holds no examples")
        if batch_size < world or batch_size % world:
            nearest = max(world, round(batch_size / world) * world)
            raise DataError(
                f"batch size {batch_size} does not split evenly over {world} ranks; "
                f"use a multiple of {world}, e.g. {nearest}"
            )
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is outside 0..{world - 1}")
        self.source, self.batch_size, self.image_size = source, batch_size, image_size
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.start_step, self.workers, self.prefetch = start_step, workers, max(prefetch, 1)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Batches in one evaluation pass (a training loader is endless)."""
        if self.train:
            raise TypeError("a training Loader is endless and has no length")
        return math.ceil(len(self.source) / self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the examples in a training epoch, drawn from (seed, epoch).

        Shapes: -> (N,) int64
        """
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) >= 2:  # a batch spans at most two epochs
                    del self._perms[min(self._perms)]
                rng = np.random.default_rng([self.seed, epoch])
                self._perms[epoch] = rng.permutation(len(self.source))
            return self._perms[epoch]

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's examples of global batch `step`, and the epoch of each.

        Shapes: -> indices (b,) int64, epochs (b,) int64
        """
        n = len(self.source)
        if not self.train:
            start, stop = step * self.batch_size, min((step + 1) * self.batch_size, n)
            mine = np.array_split(np.arange(start, stop), self.world)[self.rank]
            return mine, np.zeros_like(mine)
        local = self.batch_size // self.world
        first = step * self.batch_size + self.rank * local
        positions = np.arange(first, first + local)  # (b,) positions in the endless stream
        epochs = positions // n
        order = [self.permutation(e)[positions[epochs == e] % n] for e in np.unique(epochs)]
        return np.concatenate(order), epochs

    def make_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Build this rank's batch of global step `step`.

        Shapes: -> images (b, S, S, 3) float32, labels (b,) int32
        """
        size = self.image_size
        indices, epochs = self.indices(step)
        images = np.empty((len(indices), size, size, 3), np.float32)  # (b, S, S, 3)
        labels = np.empty(len(indices), np.int32)
        for k, (index, epoch) in enumerate(zip(indices, epochs)):
            image, labels[k] = self.source.get(int(index))
            if self.train:
                rng = np.random.default_rng([self.seed, int(epoch), int(index)])
                images[k] = train_transform(image, size, rng)
            else:
                images[k] = eval_transform(image, size)
        return images, labels

    def __iter__(self):
        steps = (
            itertools.count(self.start_step) if self.train else range(self.start_step, len(self))
        )
        if self.workers == 0:
            return (self.make_batch(step) for step in steps)
        return self._prefetched(iter(steps))

    def _prefetched(self, steps):
        """Yield batches in step order while workers build the next `prefetch` ones.

        Closing the generator (a `break`, an exception, Ctrl-C in the consumer) cancels what is
        queued and joins the workers; an exception in a worker is raised here, in step order.
        """
        prefix = f"minivit-data-{next(_POOLS)}"
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix=prefix)
        pending = collections.deque()
        try:
            for step in itertools.islice(steps, self.prefetch):
                pending.append(pool.submit(self.make_batch, step))
            while pending:
                batch = pending.popleft().result()
                for step in itertools.islice(steps, 1):
                    pending.append(pool.submit(self.make_batch, step))
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            # A Ctrl-C that lands while the pool starts a thread (inside its `start()`) leaves
            # that thread out of the pool's list, so shutdown does not wait for it; it still
            # sees the pool's stop signal and ends, and is joined here. One caught before its
            # OS thread began is listed but cannot be joined (it never runs): skipped.
            for thread in threading.enumerate():
                if thread.name.startswith(prefix + "_"):
                    with contextlib.suppress(RuntimeError):  # "cannot join ... before started"
                        thread.join()
