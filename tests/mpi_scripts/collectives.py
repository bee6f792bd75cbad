"""Run every collective once through get_communicator() and save what each worker ends up with.

Usage: mpiexec -n 2 python tests/mpi_scripts/collectives.py OUT_DIR MODE BUCKET_BYTES
MODE: mpi (CPU ranks), nccl (one GPU per rank), nccl-local (run without mpiexec: one process,
GPUs 0 and 1). Worker w starts from tree_for_rank(w, salt) and writes OUT_DIR/worker<w>.npz:
mean/<key> after allreduce_mean, bcast0/<key> and bcast1/<key> after broadcasts from worker 0
and from the last worker (each also holds an int64 `step`), host0/<key> after broadcasting a
dict of NumPy arrays from worker 0 (modes mpi and nccl: under NCCL it travels over MPI), sum_int
and sum_float after allreduce_sum, and the communicator's class name and size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from mpi_trees import tree_for_rank

from minivit.backend import Device, to_host
from minivit.distributed import get_communicator

DEVICES = {"mpi": None, "nccl": "cuda", "nccl-local": "0,1"}


def main(out_dir: Path, mode: str, bucket_bytes: int) -> None:
    comm = get_communicator(devices=DEVICES[mode], bucket_bytes=bucket_bytes)
    places = [Device.parse(device) for device in comm.devices]
    workers = list(range(comm.rank, comm.rank + len(places)))

    def per_worker(make) -> list:
        return [{k: place.put(v) for k, v in make(w).items()} for w, place in zip(workers, places)]

    def one_or_list(items: list):
        return items if len(items) > 1 else items[0]

    def with_step(tree: dict, w: int) -> dict:
        return {**tree, "step": np.array([10 * w + 7], np.int64)}

    grads = per_worker(tree_for_rank)
    first = per_worker(lambda w: with_step(tree_for_rank(w, salt=1), w))
    last = per_worker(lambda w: with_step(tree_for_rank(w, salt=2), w))
    host = tree_for_rank(comm.rank, salt=3)
    comm.allreduce_mean(one_or_list(grads))
    comm.broadcast(one_or_list(first), root=0)
    comm.broadcast(one_or_list(last), root=comm.size - 1)
    if mode != "nccl-local":
        comm.broadcast(host, root=0)
    sum_int = comm.allreduce_sum(one_or_list([np.array([w, 1], np.int64) for w in workers]))
    sum_float = comm.allreduce_sum(one_or_list([np.array(w + 0.5) for w in workers]))
    comm.barrier()
    if len(workers) == 1:
        sum_int, sum_float = [sum_int], [sum_float]
    for i, w in enumerate(workers):
        saved = {f"mean/{k}": to_host(v) for k, v in grads[i].items()}
        saved |= {f"bcast0/{k}": to_host(v) for k, v in first[i].items()}
        saved |= {f"bcast1/{k}": to_host(v) for k, v in last[i].items()}
        saved |= {"sum_int": to_host(sum_int[i]), "sum_float": to_host(sum_float[i])}
        saved |= {f"host0/{k}": v for k, v in host.items()} if mode != "nccl-local" else {}
        saved |= {"kind": np.array(type(comm).__name__), "size": np.array(comm.size)}
        np.savez(out_dir / f"worker{w}.npz", **saved)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
