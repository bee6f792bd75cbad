"""Data-parallel communication: one interface, three implementations.

Every worker holds a full copy of the model and reads its own shard of each global batch (as the
official code does with `jax.pmap` over the devices of a host). After the backward pass the
workers average their gradients (`allreduce_mean`) so each takes the same optimiser step; at start
rank 0's parameters are copied to everyone (`broadcast`).

* `SingleProcess`: one worker, every collective is the identity.
* `MPICommunicator`: processes launched by `mpiexec`, CPU (NumPy) arrays, through mpi4py.
* `NCCLCommunicator`: GPUs through `cupy.cuda.nccl`, either one process per GPU under `mpiexec`
  (MPI shares the NCCL unique id, so this works across hosts) or one process driving several
  GPUs (`devices=[0, 1, 2, 3]`, one model replica per GPU, NCCL calls grouped).

Gradients travel through one flat float32 buffer per dict: the arrays are packed in sorted key
order, the buffer is reduced in buckets of `bucket_bytes` (one collective each, all in flight at
once), then unpacked in place. `broadcast` also carries arrays of other dtypes (a step counter),
one collective each. Under the NCCL communicator, CuPy arrays go through NCCL and NumPy arrays
(optimiser state kept on the host, metric sums) through MPI.

A worker that dies or hangs must not leave the others waiting forever: MPI and per-process NCCL
collectives wait at most `MINIVIT_DIST_TIMEOUT` seconds (default 300), then rank 0 prints one
sentence naming the ranks that never arrived and aborts the job. Only NumPy is imported here;
mpi4py and CuPy are imported when a communicator needs them.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from minivit import backend

DEFAULT_BUCKET_BYTES = 64 * 2**20  # one all-reduce per 64 MB of gradients
TIMEOUT_ENV = "MINIVIT_DIST_TIMEOUT"  # seconds a collective may wait for the slowest rank
DEFAULT_TIMEOUT_S = 300.0
SPIN_S = 0.05  # poll without sleeping this long, then sleep POLL_SLEEP_S between polls
POLL_SLEEP_S = 0.0005
# Launchers and the variable that carries the number of ranks they started.
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHER_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")

Tree = dict[str, Any]  # official key -> array (gradients or parameters)


class DistributedError(RuntimeError):
    """A collective cannot run: bad arguments, a missing package, or a peer that failed."""


# ---- batch arithmetic --------------------------------------------------------------------------
def split_batch(global_batch: int, world: int, accum_steps: int = 1) -> int:
    """Return the micro-batch each worker computes per accumulation step.

    Shapes: global_batch = world x per_worker_micro x accum_steps.
    The examples of one optimiser step do not depend on `world`; a batch that does not split
    evenly is refused before any data is read, naming the nearest valid `--batch`.
    """
    for name, value in (
        ("--batch", global_batch),
        ("workers", world),
        ("--accum_steps", accum_steps),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    unit = world * accum_steps
    if global_batch % unit == 0:
        return global_batch // unit
    lower, upper = (global_batch // unit) * unit, (global_batch // unit + 1) * unit
    nearest = upper if lower == 0 or upper - global_batch <= global_batch - lower else lower
    raise ValueError(
        f"--batch {global_batch} cannot be split over {world} workers x accum {accum_steps} "
        f"(it must be a multiple of {unit}); use --batch {nearest}"
    )


def startup_line(world: int, per_worker: int, accum: int) -> str:
    """The line a run prints at start.

    Example: `4 workers x 128 per worker x accum 1 = global batch 512`.
    """
    workers = "worker" if world == 1 else "workers"
    return (
        f"{world} {workers} x {per_worker} per worker x accum {accum} "
        f"= global batch {world * per_worker * accum}"
    )


# ---- environment -------------------------------------------------------------------------------
def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """Number of ranks the MPI launcher started (1 when not launched by mpiexec or mpirun).

    Reads the launcher's environment (Open MPI, MPICH/Hydra, Intel MPI, MVAPICH, PMIx), so
    mpi4py is not imported by a plain single-process run. Returns 0 when a PMIx launcher gave a
    rank but no size: the caller must ask MPI.
    """
    env = os.environ if environ is None else environ
    for name in LAUNCHER_SIZE_VARS:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 0 if "PMIX_RANK" in env else 1


def launched_rank(environ: dict[str, str] | None = None) -> int:
    """This process's rank as the MPI launcher set it (0 when not launched by mpiexec/mpirun)."""
    env = os.environ if environ is None else environ
    for name in LAUNCHER_RANK_VARS:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 0


def dist_timeout(environ: dict[str, str] | None = None) -> float:
    """Seconds a collective waits for the slowest rank: `MINIVIT_DIST_TIMEOUT`, default 300."""
    raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; e.g. use 300")
    return seconds


def parse_devices(devices: str | int | Sequence[int] | None) -> list[int] | str | None:
    """Read a `--devices` value: None/"cpu" -> None, "cuda" -> "cuda", "cuda:1"/"0,1,2" -> [ids].

    "cuda" means one GPU per process: the process's local rank under mpiexec, else GPU 0.
    """
    if devices is None or isinstance(devices, str) and devices.strip().lower() in ("", "cpu"):
        return None
    if isinstance(devices, str) and devices.strip().lower() == "cuda":
        return "cuda"
    items = devices.split(",") if isinstance(devices, str) else devices
    items = [items] if isinstance(items, int) else items
    ids = []
    for item in items:
        text = str(item).strip().lower().removeprefix("cuda:")
        if not text.isdigit():
            raise ValueError(
                f"--devices {devices!r} is not understood; use 'cpu', 'cuda', 'cuda:N' or '0,1,2,3'"
            )
        ids.append(int(text))
    if len(set(ids)) != len(ids):
        raise ValueError(f"--devices {devices!r} names a GPU twice; list each GPU once")
    return ids


# ---- the flat buffer ---------------------------------------------------------------------------
Layout = tuple[tuple[str, tuple[int, ...], str], ...]  # (key, shape, dtype name), sorted by key


def layout_of(tree: Tree) -> Layout:
    """The (key, shape, dtype name) of every array of `tree`, in sorted key order."""
    return tuple((key, tuple(tree[key].shape), tree[key].dtype.name) for key in sorted(tree))


def split_layout(layout: Layout) -> tuple[Layout, Layout]:
    """(float32 entries, which share the flat buffer; entries of any other dtype)."""
    floats = tuple(entry for entry in layout if entry[2] == "float32")
    return floats, tuple(entry for entry in layout if entry[2] != "float32")


class FlatBuffer:
    """One contiguous float32 buffer for every array of a layout, cut into buckets.

    Shapes: data (T,) with T = the total number of elements, arrays in sorted key order;
    buckets are consecutive views of data of at most bucket_bytes / 4 elements.
    """

    def __init__(self, layout: Layout, xp=np, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        for key, _, dtype in layout:
            if dtype != "float32":
                raise DistributedError(
                    f"array {key!r} is {dtype}; gradients are averaged as float32 arrays only"
                )
        self.layout = layout
        sizes = [int(np.prod(shape)) for _, shape, _ in layout]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        self.data = xp.empty(self.offsets[-1], dtype=backend.DTYPE)  # (T,)
        step = max(1, bucket_bytes // self.data.itemsize)
        self.buckets = [self.data[i : i + step] for i in range(0, self.data.size, step)]

    def pack(self, tree: Tree) -> None:
        """Copy the arrays of the layout from `tree` into the buffer."""
        for (key, _, _), start, stop in zip(self.layout, self.offsets, self.offsets[1:]):
            self.data[start:stop] = tree[key].reshape(-1)

    def unpack(self, tree: Tree, divide_by: int = 1) -> None:
        """Write the buffer (divided by `divide_by`) back into the arrays of `tree`, in place."""
        if divide_by != 1:
            self.data /= divide_by
        for (key, shape, _), start, stop in zip(self.layout, self.offsets, self.offsets[1:]):
            tree[key][...] = self.data[start:stop].reshape(shape)


def _contiguous(tree: Tree, key: str):
    """tree[key], which a collective reads and writes in place, so it must be contiguous."""
    if not tree[key].flags.c_contiguous:
        raise DistributedError(f"array {key!r} is not contiguous; pass a contiguous copy")
    return tree[key]


def _poll(ready: Callable[[], bool], deadline: float) -> bool:
    """Call `ready()` until it is true (-> True) or `deadline` (time.monotonic) passes (-> False).

    Spins for SPIN_S (an MPI collective only progresses inside MPI calls), then sleeps between
    polls so a long wait for a slow rank does not burn a core.
    """
    spin_until = time.monotonic() + SPIN_S
    while not ready():
        now = time.monotonic()
        if now > deadline:
            return False
        if now > spin_until:
            time.sleep(POLL_SLEEP_S)
    return True


# ---- the interface -----------------------------------------------------------------------------
class Communicator:
    """What the trainer sees: rank, size and four collectives over all workers.

    A worker is one model replica. `size` counts workers over all processes; this process runs
    workers `rank .. rank + len(devices) - 1` on `devices` ("cpu" or "cuda:N"). Methods take a
    dict (or, for a process driving several GPUs, a list with one dict per device).
    """

    rank: int = 0
    size: int = 1
    devices: list[str]  # set by each implementation
    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    @property
    def is_main(self) -> bool:
        """True on the worker that prints, writes metrics and checkpoints."""
        return self.rank == 0

    def allreduce_mean(self, grads: Tree | list[Tree]) -> None:
        """Replace every float32 array of `grads` by its mean over all workers, in place."""
        raise NotImplementedError

    def broadcast(self, params: Tree | list[Tree], root: int = 0) -> None:
        """Overwrite every array of `params` (any dtype) with worker `root`'s, in place."""
        raise NotImplementedError

    def allreduce_sum(self, array):
        """Return the element-wise sum of `array` over all workers (a new array)."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Return once every worker has called barrier()."""
        raise NotImplementedError

    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.size:
            raise DistributedError(
                f"broadcast root {root} does not exist; workers are 0..{self.size - 1}"
            )

    def _buffer(self, layout: Layout, xp=np, slot: int = 0) -> FlatBuffer:
        """The cached flat buffer of local replica `slot` (grads and params share one)."""
        cache = self.__dict__.setdefault("_buffers", {})
        if (slot, layout) not in cache:
            cache[slot, layout] = FlatBuffer(layout, xp, self.bucket_bytes)
        return cache[slot, layout]


class SingleProcess(Communicator):
    """One worker: the mean, sum and broadcast over one worker leave the data as it is."""

    def __init__(self, device: str = "cpu"):
        self.devices = [str(backend.Device.parse(device))]

    def allreduce_mean(self, grads: Tree | list[Tree]) -> None:
        """Mean over one worker: nothing to do."""

    def broadcast(self, params: Tree | list[Tree], root: int = 0) -> None:
        """Broadcast from the only worker: nothing to do."""
        self._check_root(root)

    def allreduce_sum(self, array):
        """Sum over one worker: a copy of `array`."""
        return backend.xp_of(array).array(array, copy=True)

    def barrier(self) -> None:
        """One worker never waits."""


# ---- MPI ---------------------------------------------------------------------------------------
def _import_mpi():
    """mpi4py's MPI module, or one sentence saying how to install it."""
    try:
        from mpi4py import MPI  # noqa: PLC0415  (optional extra, imported lazily)
    except ImportError as error:
        raise DistributedError(
            f"the MPI communicator needs mpi4py ({error}); "
            f"install it with pip install 'minivit[mpi]'"
        ) from error
    return MPI


class _Watchdog:
    """Bounded waiting for MPI collectives, naming the rank that failed.

    At every collective each rank sends rank 0 a tiny note (collective number, kind) before
    waiting. Rank 0 therefore knows who arrived: past the deadline it names the ranks it never
    heard from and aborts the job; a note of another kind means the ranks diverged. The other
    ranks wait a grace period longer, so they only speak when rank 0 itself is gone.
    """

    KINDS = ("all-reduce", "broadcast", "sum", "barrier", "layout check")
    TAG = 7007

    def __init__(self, comm, timeout: float):
        self.comm = comm
        self.timeout = timeout
        self.grace = max(5.0, 0.1 * timeout)
        self.count = 0

    def wait(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll `ready` (the collective, already started) until it and every note are done."""
        self.count += 1
        comm, note = self.comm, np.array([self.count, self.KINDS.index(what)], np.int64)
        if comm.rank == 0:
            heard = np.zeros((comm.size, 2), np.int64)  # (ranks, 2)
            pending = {r: comm.Irecv(heard[r], source=r, tag=self.TAG) for r in range(1, comm.size)}
        else:
            pending = {0: comm.Isend(note, dest=0, tag=self.TAG)}

        def done() -> bool:
            for rank in [rank for rank, request in pending.items() if request.Test()]:
                del pending[rank]
                if comm.rank == 0 and not np.array_equal(heard[rank], note):
                    kind, count = self.KINDS[heard[rank, 1]], heard[rank, 0]
                    self.abort(
                        f"rank {rank} is at collective #{count} ({kind}) while rank 0 is at "
                        f"#{self.count} ({what}); every rank must run the same collectives "
                        f"in the same order"
                    )
            return ready() and not pending

        limit = self.timeout if comm.rank == 0 else self.timeout + self.grace
        try:
            finished = _poll(done, time.monotonic() + limit)
        except Exception as error:  # noqa: BLE001  (an MPI or NCCL error raised by a failed peer)
            self.abort(f"{self._late(what, sorted(pending), limit)} ({error})")
        if not finished:
            self.abort(self._late(what, sorted(pending), limit))

    def _late(self, what: str, missing: list[int], waited: float) -> str:
        """Which rank failed, as far as this rank can tell."""
        step = f"collective #{self.count} ({what})"
        if self.comm.rank != 0:
            return (
                f"rank {self.comm.rank} waited {waited:g} s for {step} and rank 0, which names "
                f"late ranks, did not stop the job, so rank 0 died or hangs"
            )
        if missing:
            ranks = ", ".join(str(rank) for rank in missing)
            s = "s" if len(missing) > 1 else ""
            return f"rank{s} {ranks} did not reach {step} within {waited:g} s (died or hangs)"
        return f"every rank reached {step} but it did not finish within {waited:g} s"

    def abort(self, message: str) -> None:
        """Print one sentence on stderr and stop every rank of the job."""
        line = f"minivit.distributed: {message}; stopping all {self.comm.size} ranks.\n"
        os.write(sys.stderr.fileno(), line.encode())
        self.comm.Abort(1)


class MPICommunicator(Communicator):
    """Workers are MPI processes (one per CPU host or core group); arrays are NumPy arrays.

    Collectives are non-blocking MPI calls watched by a `_Watchdog`, so a failed peer stops the
    job within `timeout` seconds (MINIVIT_DIST_TIMEOUT) instead of hanging it.
    """

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout: float | None = None):
        self.MPI = _import_mpi()
        self.comm = self.MPI.COMM_WORLD.Dup()  # our own context: no clash with user messages
        self.rank, self.size = self.comm.rank, self.comm.size
        self.devices = ["cpu"]
        self.bucket_bytes = bucket_bytes
        self.watch = _Watchdog(self.comm, dist_timeout() if timeout is None else timeout)
        self.agreed: set[Layout] = set()  # layouts every rank is known to share

    def allreduce_mean(self, grads: Tree) -> None:
        """Pack, sum each bucket over the ranks (all in flight at once), unpack divided by size."""
        buffer = self._buffer(self._layout(grads, "allreduce_mean"))
        buffer.pack(grads)
        sum_op, in_place = self.MPI.SUM, self.MPI.IN_PLACE
        requests = [self.comm.Iallreduce(in_place, bucket, op=sum_op) for bucket in buffer.buckets]
        self.watch.wait("all-reduce", lambda: self.MPI.Request.Testall(requests))
        buffer.unpack(grads, divide_by=self.size)

    def broadcast(self, params: Tree, root: int = 0) -> None:
        """Copy rank `root`'s arrays into every other rank's: float32 ones through the buffer."""
        self._check_root(root)
        floats, others = split_layout(self._layout(params, "broadcast"))
        buffer = self._buffer(floats)
        if self.rank == root:
            buffer.pack(params)
        requests = [self.comm.Ibcast(bucket, root=root) for bucket in buffer.buckets]
        requests += [self.comm.Ibcast(_contiguous(params, key), root=root) for key, *_ in others]
        self.watch.wait("broadcast", lambda: self.MPI.Request.Testall(requests))
        if self.rank != root:
            buffer.unpack(params)

    def allreduce_sum(self, array) -> np.ndarray:
        """Element-wise sum over the ranks of a NumPy array (any numeric dtype)."""
        out = np.array(array, copy=True, order="C")
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, out.reshape(-1), op=self.MPI.SUM)
        self.watch.wait("sum", request.Test)
        return out

    def barrier(self) -> None:
        """Wait (boundedly) until every rank has arrived."""
        request = self.comm.Ibarrier()
        self.watch.wait("barrier", request.Test)

    def _layout(self, tree: Tree, what: str) -> Layout:
        """The layout of a dict of NumPy arrays, checked to match on every rank."""
        if not isinstance(tree, dict):
            kind = type(tree).__name__
            raise DistributedError(f"{what} on an MPI worker takes one dict, got a {kind}")
        for key, array in tree.items():
            if not isinstance(array, np.ndarray):
                raise DistributedError(
                    f"array {key!r} is a {type(array).__name__} but the MPI communicator takes "
                    f"NumPy arrays; GPU arrays are reduced through NCCL (--devices cuda)"
                )
        layout = layout_of(tree)
        self.agree(layout)
        return layout

    def agree(self, layout: Layout) -> None:
        """Raise on every rank when some rank's keys, shapes or dtypes differ from rank 0's.

        Runs once per new layout (one small all-gather of a checksum).
        """
        if layout in self.agreed:
            return
        every = np.empty(self.size, np.int64)  # (ranks,)
        mine = np.array([zlib.crc32(repr(layout).encode())], np.int64)
        request = self.comm.Iallgather(mine, every)
        self.watch.wait("layout check", request.Test)
        differ = np.flatnonzero(every != every[0])
        if differ.size:
            raise DistributedError(
                f"rank {differ[0]} passed arrays whose keys, shapes or dtypes differ from "
                f"rank 0's; every worker must pass the same dict"
            )
        self.agreed.add(layout)


# ---- NCCL --------------------------------------------------------------------------------------
class NCCLCommunicator(Communicator):
    """Workers are GPUs; CuPy arrays are reduced by NCCL on each device's current stream.

    Two ways to start it. Under mpiexec each process drives one GPU (its rank among the ranks
    of its host, or `devices[that rank]`); rank 0 creates the NCCL unique id and MPI broadcasts
    it, so ranks may sit on several hosts, the MPI watchdog bounds every wait, and NumPy arrays
    (host-side optimiser state, metric sums) go through MPI. In a single process it drives every
    GPU of `devices` through `NcclCommunicator.initAll`: one replica per GPU, methods take one
    dict per device, the calls of all devices sit in one NCCL group.
    """

    NCCL_TYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}
    NCCL_TYPES |= {"int32": "NCCL_INT32", "int64": "NCCL_INT64"}

    def __init__(
        self,
        devices: list[int] | str | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout: float | None = None,
    ):
        self.cp = backend.cupy_module()
        if self.cp is None:
            raise DistributedError("the NCCL communicator needs CuPy; pip install 'minivit[gpu]'")
        from cupy.cuda import nccl  # noqa: PLC0415  (optional extra, imported lazily)

        self.nccl, self.bucket_bytes = nccl, bucket_bytes
        self.timeout = dist_timeout() if timeout is None else timeout
        self.mpi = None if launched_world_size() == 1 else MPICommunicator(bucket_bytes, timeout)
        if self.mpi is not None:
            self.ids = [self._local_gpu(devices)]
            self.rank, self.size = self.mpi.rank, self.mpi.size
            uid = self.mpi.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
            with self.cp.cuda.Device(self.ids[0]):
                self.comms = [nccl.NcclCommunicator(self.size, uid, self.rank)]
        else:
            count = self.cp.cuda.runtime.getDeviceCount()
            self.ids = devices if isinstance(devices, list) else list(range(count))
            self.rank, self.size = 0, len(self.ids)
            self.comms = nccl.NcclCommunicator.initAll(list(self.ids))
        self.devices = [f"cuda:{i}" for i in self.ids]

    def _local_gpu(self, devices: list[int] | str | None) -> int:
        """The GPU of this process: its rank among the ranks on its host picks it."""
        local = self.mpi.comm.Split_type(self.mpi.MPI.COMM_TYPE_SHARED)
        local_rank, local_size = local.rank, local.size
        local.Free()
        if isinstance(devices, list):
            if local_size > len(devices):
                raise DistributedError(
                    f"--devices lists {len(devices)} GPU(s) but {local_size} ranks run on this "
                    f"host; list one GPU per rank of a host, or pass --devices cuda"
                )
            return devices[local_rank]
        count = self.cp.cuda.runtime.getDeviceCount()
        if local_size > count:
            raise DistributedError(
                f"{local_size} ranks run on a host with {count} GPU(s); start at most one "
                f"rank per GPU on each host"
            )
        return local_rank

    def allreduce_mean(self, grads: Tree | list[Tree]) -> None:
        """Pack on each device, sum every bucket over all GPUs, unpack divided by size."""
        if self._on_host(grads):
            self.mpi.allreduce_mean(grads)
            return
        trees = self._replicas(grads, "allreduce_mean")
        layout = self._layout(trees)
        buffers = self._on_devices(lambda i: self._buffer(layout, self.cp, i))
        self._on_devices(lambda i: buffers[i].pack(trees[i]))
        float32, add = self.nccl.NCCL_FLOAT32, self.nccl.NCCL_SUM

        def enqueue(i: int, comm, stream: int) -> None:
            for bucket in buffers[i].buckets:
                ptr = bucket.data.ptr
                comm.allReduce(ptr, ptr, bucket.size, float32, add, stream)

        self._group("all-reduce", enqueue)
        self._on_devices(lambda i: buffers[i].unpack(trees[i], divide_by=self.size))

    def broadcast(self, params: Tree | list[Tree], root: int = 0) -> None:
        """Copy worker `root`'s arrays into every other worker's."""
        if self._on_host(params):
            self.mpi.broadcast(params, root)
            return
        self._check_root(root)
        trees = self._replicas(params, "broadcast")
        floats, others = split_layout(self._layout(trees))
        buffers = self._on_devices(lambda i: self._buffer(floats, self.cp, i))
        is_root = [self.rank + i == root for i in range(len(trees))]
        self._on_devices(lambda i: buffers[i].pack(trees[i]) if is_root[i] else None)

        def enqueue(i: int, comm, stream: int) -> None:
            for bucket in buffers[i].buckets:
                comm.bcast(bucket.data.ptr, bucket.size, self.nccl.NCCL_FLOAT32, root, stream)
            for key, _, dtype in others:
                array = _contiguous(trees[i], key)
                comm.bcast(array.data.ptr, array.size, self._nccl_type(dtype), root, stream)

        self._group("broadcast", enqueue)
        self._on_devices(lambda i: None if is_root[i] else buffers[i].unpack(trees[i]))

    def allreduce_sum(self, array):
        """Element-wise sum over all workers, one array per local device; NumPy in -> NumPy out.

        In a process of an MPI job NumPy arrays go through MPI; otherwise NCCL sums copies
        made on each device.
        """
        if isinstance(array, np.ndarray) and self.mpi is not None:
            return self.mpi.allreduce_sum(array)
        arrays = array if isinstance(array, list) else [array]
        if len(arrays) != len(self.ids):
            raise DistributedError(
                f"allreduce_sum on this process takes one array per device "
                f"({', '.join(self.devices)}), got {len(arrays)}"
            )
        kind = self._nccl_type(arrays[0].dtype.name)
        outs = self._on_devices(lambda i: self.cp.array(arrays[i], copy=True, order="C"))

        def enqueue(i: int, comm, stream: int) -> None:
            ptr = outs[i].data.ptr
            comm.allReduce(ptr, ptr, outs[i].size, kind, self.nccl.NCCL_SUM, stream)

        self._group("sum", enqueue)
        outs = [backend.to_host(out) if isinstance(array, np.ndarray) else out for out in outs]
        return outs if isinstance(array, list) else outs[0]

    def barrier(self) -> None:
        """Finish this process's GPU work, then wait for the other processes."""
        self._on_devices(lambda i: self.cp.cuda.get_current_stream().synchronize())
        if self.mpi is not None:
            self.mpi.barrier()

    def _on_host(self, tree) -> bool:
        """True for a dict of NumPy arrays in a process of an MPI job: MPI carries it."""
        if self.mpi is None or not isinstance(tree, dict):
            return False
        return all(isinstance(array, np.ndarray) for array in tree.values())

    def _replicas(self, trees: Tree | list[Tree], what: str) -> list[Tree]:
        """One dict per local device, its arrays on that device (a lone dict for one device)."""
        trees = trees if isinstance(trees, list) else [trees]
        if len(trees) != len(self.ids) or not all(isinstance(tree, dict) for tree in trees):
            raise DistributedError(
                f"{what} on this process takes one dict per device "
                f"({', '.join(self.devices)}), got {len(trees)} item(s)"
            )
        for gpu, tree in zip(self.ids, trees):
            for key, array in tree.items():
                if not isinstance(array, self.cp.ndarray) or array.device.id != gpu:
                    raise DistributedError(
                        f"{what}: {key!r} must be a CuPy array on cuda:{gpu}, got a "
                        f"{type(array).__name__} on {getattr(array, 'device', 'the host')}"
                    )
        return trees

    def _layout(self, trees: list[Tree]) -> Layout:
        """The layout shared by every local replica and, under MPI, by every rank."""
        layouts = [layout_of(tree) for tree in trees]
        for device, layout in zip(self.devices, layouts):
            if layout != layouts[0]:
                raise DistributedError(
                    f"the arrays on {device} differ in keys, shapes or dtypes from those on "
                    f"{self.devices[0]}; every replica must pass the same dict"
                )
        if self.mpi is not None:
            self.mpi.agree(layouts[0])
        return layouts[0]

    def _nccl_type(self, dtype: str) -> int:
        if dtype not in self.NCCL_TYPES:
            raise DistributedError(f"NCCL carries {', '.join(self.NCCL_TYPES)} arrays, not {dtype}")
        return getattr(self.nccl, self.NCCL_TYPES[dtype])

    def _on_devices(self, work: Callable[[int], Any]) -> list:
        """[work(i) for each local device i], each run with device i current."""
        results = []
        for i, gpu in enumerate(self.ids):
            with self.cp.cuda.Device(gpu):
                results.append(work(i))
        return results

    def _group(self, what: str, enqueue: Callable[[int, Any, int], None]) -> None:
        """Enqueue every device's calls inside one NCCL group, then wait boundedly."""
        streams = []
        self.nccl.groupStart()
        try:
            for i, (gpu, comm) in enumerate(zip(self.ids, self.comms)):
                with self.cp.cuda.Device(gpu):
                    streams.append(self.cp.cuda.get_current_stream())
                    enqueue(i, comm, streams[-1].ptr)
        finally:
            self.nccl.groupEnd()

        def done() -> bool:
            for comm in self.comms:
                comm.check_async_error()  # raises NcclError when a peer connection broke
            return all(stream.done for stream in streams)

        if self.mpi is not None:
            self.mpi.watch.wait(what, done)
        elif not _poll(done, time.monotonic() + self.timeout):
            for comm in self.comms:
                comm.abort()
            raise DistributedError(
                f"NCCL {what} over {', '.join(self.devices)} did not finish within "
                f"{self.timeout:g} s ({TIMEOUT_ENV}); a GPU hangs"
            )


# ---- choosing one ------------------------------------------------------------------------------
KINDS = ("auto", "single", "mpi", "nccl")


def get_communicator(
    kind: str = "auto",
    devices: str | int | Sequence[int] | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Communicator:
    """Build the communicator for how this process was started.

    auto: MPI when launched by mpiexec/mpirun with more than one rank (NCCL instead when GPUs
    are asked for), NCCL when one process is given several GPUs, else a single process.
    `devices`: None or "cpu", "cuda" (one GPU per process), "cuda:N", or a list such as "0,1,2,3".
    """
    if kind not in KINDS:
        raise ValueError(f"communicator kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    wanted = parse_devices(devices)
    several = isinstance(wanted, list) and len(wanted) > 1
    if kind == "auto":
        if launched_world_size() != 1:
            kind = "mpi" if wanted is None else "nccl"
        else:
            kind = "nccl" if several else "single"
    if kind == "single":
        if several:
            raise ValueError(f"--devices {devices} names several GPUs; one process needs NCCL")
        gpu = None if wanted is None else 0 if wanted == "cuda" else wanted[0]
        return SingleProcess("cpu" if gpu is None else f"cuda:{gpu}")
    if kind == "mpi":
        if wanted is not None:
            raise ValueError(
                f"the MPI communicator reduces CPU arrays; drop --devices {devices} "
                f"or let GPUs reduce through NCCL"
            )
        return MPICommunicator(bucket_bytes)
    return NCCLCommunicator(wanted, bucket_bytes)
