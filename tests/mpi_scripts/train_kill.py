"""The built-in demo under mpiexec, with rank 1 dying right after a given step.

Usage: MINIVIT_DIST_TIMEOUT=3 mpiexec -disable-auto-cleanup -n 2 \
           python tests/mpi_scripts/train_kill.py STEP '{"workdir": ..., "total_steps": ...}'
The JSON object overrides fields of the demo recipe (`TrainConfig.demo`). Rank 1 exits without a
word after finishing step STEP (its checkpoint included); rank 0 goes on to the next all-reduce,
where minivit's watchdog must name rank 1 and stop the job.
"""

from __future__ import annotations

import json
import os
import sys

from minivit.train import TrainConfig, finetune


def main(die_after: int, overrides: dict) -> None:
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()

    def step_hook(step: int) -> None:
        if rank == 1 and step == die_after:
            os._exit(1)

    finetune(TrainConfig.demo(**overrides), step_hook=step_hook)


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]))
