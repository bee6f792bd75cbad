"""A few gradient all-reduces in which rank 1 misbehaves at step 3; rank 0 must stop the job.

Usage: MINIVIT_DIST_TIMEOUT=2 mpiexec -n 2 python tests/mpi_scripts/failure.py MODE
MODE: die (rank 1 exits without a word), hang (rank 1 sleeps), diverge (rank 1 calls barrier
while rank 0 calls allreduce_mean), layout (rank 1 passes an extra array from step 0 on).
Rank 0 prints `step N done` after each completed step.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from mpi_trees import tree_for_rank

from minivit.distributed import MPICommunicator


def main(mode: str) -> None:
    comm = MPICommunicator()
    for step in range(5):
        grads = tree_for_rank(comm.rank)
        if comm.rank == 1 and mode == "layout":
            grads["extra"] = np.zeros(2, np.float32)
        if comm.rank == 1 and step == 3:
            if mode == "die":
                os._exit(3)
            if mode == "hang":
                time.sleep(120)
            if mode == "diverge":
                comm.barrier()
        comm.allreduce_mean(grads)
        if comm.is_main:
            print(f"step {step} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
