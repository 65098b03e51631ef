"""All MPI lives here.  The rest of es-mpi sees a `Comm` with a handful of
collectives; a serial run is a communicator of size 1, not a second path.

Only plain buffers cross the wire (float64 arrays, bytes of JSON or digests):
nothing is pickled, so no rank ever unpickles data.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, TypeVar

import numpy as np

from .errors import UserError

T = TypeVar("T")

try:  # mpi4py is a hard dependency, but a broken MPI install should still allow serial use
    from mpi4py import MPI
except Exception:  # pragma: no cover - exercised only on machines without MPI
    MPI = None


class Comm:
    """Thin wrapper over an MPI communicator (or none, for size 1)."""

    def __init__(self, mpi_comm: Any = None):
        self._c = mpi_comm
        if mpi_comm is None:
            self.rank, self.size = 0, 1
            self.local_rank, self.local_size = 0, 1
        else:
            self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
            # Node-local rank from a shared-memory split: works under srun, mpirun
            # and any launcher, unlike launcher-specific environment variables.
            local = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            local.Free()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- collectives -------------------------------------------------------
    def allgather_floats(self, buf: np.ndarray) -> np.ndarray:
        """The per-generation exchange: one Allgather of a float64 buffer.
        Returns shape (size, *buf.shape)."""
        buf = np.ascontiguousarray(buf, dtype=np.float64)
        out = np.empty((self.size,) + buf.shape, dtype=np.float64)
        if self._c is None:
            out[0] = buf
        else:
            self._c.Allgather(buf, out)
        return out

    def allgather_bytes(self, data: bytes, width: int) -> list[bytes]:
        """Gather a fixed-width byte string (e.g. a digest) from every rank."""
        if len(data) != width:
            raise ValueError(f"allgather_bytes: expected {width} bytes, got {len(data)}")
        send = np.frombuffer(data, dtype=np.uint8)
        out = np.empty((self.size, width), dtype=np.uint8)
        if self._c is None:
            out[0] = send
        else:
            self._c.Allgather(send, out)
        return [bytes(row) for row in out]

    def bcast_json(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a JSON-serialisable object from root (length, then bytes)."""
        if self._c is None:
            return obj
        payload = json.dumps(obj).encode() if self.rank == root else b""
        n = np.array([len(payload)], dtype=np.int64)
        self._c.Bcast(n, root=root)
        buf = np.frombuffer(payload, dtype=np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self._c.Bcast(buf, root=root)
        return json.loads(buf.tobytes().decode())

    def allgather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-serialisable object, in rank order (lengths, then
        one Allgatherv of bytes).  For evaluation results, not the hot path."""
        payload = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        if self._c is None:
            return [obj]
        lens = self.allgather_floats(np.array([payload.size], dtype=np.float64))[:, 0].astype(np.int64)
        out = np.empty(int(lens.sum()), dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        self._c.Allgatherv(payload, [out, lens, displs, MPI.BYTE])
        return [json.loads(out[d:d + n].tobytes().decode()) for d, n in zip(displs, lens)]

    def barrier(self) -> None:
        if self._c is not None:
            self._c.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank now (used when one rank hits an error the others cannot see)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self._c is not None and self.size > 1:
            self._c.Abort(code)
        os._exit(code)

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if any rank raises UserError, every rank raises
        the lowest failing rank's error.  Costs one small Allgather + Bcast, used
        only during set-up, so a bad input gives a clean exit 2 everywhere instead
        of a hang or an MPI_Abort banner."""
        err: UserError | None = None
        result: Any = None
        try:
            result = fn()
        except UserError as e:
            err = e
        flags = self.allgather_floats(np.array([1.0 if err else 0.0]))[:, 0]
        failed = [r for r in range(self.size) if flags[r]]
        if not failed:
            return result
        first = failed[0]
        msg = self.bcast_json(str(err) if self.rank == first else None, root=first)
        raise UserError(msg)


_WORLD: Comm | None = None


def init() -> Comm:
    """The world communicator (created once).  Installs an exception hook that
    aborts all ranks when one rank dies of an uncaught exception, so a failing
    rank never leaves the others hanging in a collective."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if MPI is None:
        _WORLD = Comm(None)
        return _WORLD
    _WORLD = Comm(MPI.COMM_WORLD)
    if _WORLD.size > 1:
        prev = sys.excepthook

        def hook(tp, value, tb):  # pragma: no cover - runs in dying ranks
            prev(tp, value, tb)
            _WORLD.abort(1)

        sys.excepthook = hook
    return _WORLD


def serial() -> Comm:
    """A size-1 communicator, for tests and tools."""
    return Comm(None)


def pick_device(pref: str, comm: Comm) -> str:
    """This rank's device: CPU, or the CUDA device of its node-local rank.

    The local rank is the MPI shared-memory split's (Comm.local_rank), never a
    launcher variable: under `mpirun` inside a Slurm allocation every rank
    inherits the same SLURM_LOCALID, which put all ranks on cuda:0.  With one
    visible device per rank (srun --gpus-per-task=1, or a per-rank
    CUDA_VISIBLE_DEVICES) the index is 0; with several visible, the local rank
    picks one, and more local ranks than devices is refused (`local % n`
    silently stacked ranks on one card).  The caller then runs
    check_devices_unique, which catches ranks that still share a card.
    Raises UserError; calls torch.cuda.set_device so that libraries that use
    "the current device" (vLLM, NCCL-free CUDA code) use this one."""
    import torch

    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError("model.device: 'cuda' requested but no CUDA device is visible")
    n = torch.cuda.device_count()
    local, on_node = comm.local_rank, comm.local_size
    if n == 1:
        index = 0
    elif on_node > n:
        raise UserError(f"{on_node} ranks on this node but {n} visible GPUs: one GPU per rank "
                        f"(start at most {n} ranks per node, or bind one GPU to each rank)")
    else:
        index = local
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def device_identity(device: str) -> str:
    """"host/GPU UUID" for a CUDA device (its PCI bus address where torch has no
    UUID), or "" for the CPU."""
    import socket

    import torch

    if not device.startswith("cuda"):
        return ""
    props = torch.cuda.get_device_properties(torch.device(device))
    uid = getattr(props, "uuid", None) or getattr(props, "pci_bus_id", None) or device
    return f"{socket.gethostname()}/{uid}"


def check_devices_unique(device: str, comm: Comm) -> None:
    """Every rank gathers every rank's (host, GPU UUID); ranks that share a
    GPU raise the same one-line UserError on every rank, naming them.  One
    small Allgatherv at set-up.  CPU ranks share cores by design: not checked."""
    ids = comm.allgather_json(device_identity(device))
    seen: dict[str, list[int]] = {}
    for r, ident in enumerate(ids):
        if ident:
            seen.setdefault(ident, []).append(r)
    shared = [(ident, ranks) for ident, ranks in seen.items() if len(ranks) > 1]
    if shared:
        ident, ranks = shared[0]
        raise UserError(f"ranks {', '.join(map(str, ranks))} share GPU {ident}: es-mpi needs one GPU per rank "
                        "(fewer ranks per node, or srun --gpus-per-task=1)")


def default_threads(comm: Comm) -> int:
    """Cores this rank may use: the process's CPU set divided among the ranks
    on this node.  Oversubscribing (2 ranks x 2 threads on 2 cores) measured
    about 10x slower here, so never more than cores // local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    # mpiexec may bind each rank to one core; the affinity set already says so.
    if cores >= (os.cpu_count() or cores):
        cores = max(1, cores // comm.local_size)
    return max(1, cores)
