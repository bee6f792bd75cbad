"""The rank-dependent arrays the MPI scripts reduce, shared with tests/test_distributed.py.

Shapes cover a scalar, a vector, a matrix and a 3-D array, so the flat buffer crosses key
boundaries inside buckets when the bucket is small.
"""

from __future__ import annotations

import numpy as np

SHAPES = {"head/bias": (3,), "cls": (), "head/kernel": (5, 7), "embedding/kernel": (2, 3, 4)}


def tree_for_rank(rank: int, salt: int = 0) -> dict[str, np.ndarray]:
    """Float32 arrays drawn from a generator seeded by (rank, salt)."""
    rng = np.random.default_rng([rank, salt])
    return {key: rng.standard_normal(shape).astype(np.float32) for key, shape in SHAPES.items()}
