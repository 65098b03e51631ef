"""One GPU per rank (issue 16 item 2), with torch.cuda monkeypatched: the
local rank comes from MPI's shared-memory split, never from SLURM_LOCALID,
and ranks that share a GPU are refused on every rank."""
from __future__ import annotations

import types

import pytest
import torch

from es_mpi.comm import check_devices_unique, pick_device
from es_mpi.errors import UserError


class FakeComm:
    """Rank `rank` of `size`, `local_rank` of `local_size` on its node; the
    gather returns `others` (what every rank sent) with this rank's entry in."""

    def __init__(self, rank=0, size=1, local_rank=0, local_size=1, others=None):
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self.others = others

    @property
    def is_root(self):
        return self.rank == 0

    def allgather_json(self, obj):
        out = list(self.others) if self.others is not None else [obj]
        out[self.rank] = obj
        return out


@pytest.fixture
def gpus(monkeypatch):
    """torch.cuda with `n` visible devices of given UUIDs; records set_device."""
    state = {"set": [], "uuids": ["GPU-a", "GPU-b", "GPU-c", "GPU-d"], "n": 4}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["n"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: state["set"].append(i))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(uuid=state["uuids"][torch.device(d).index or 0]))
    return state


def test_local_rank_from_mpi_not_slurm_localid(gpus, monkeypatch):
    # mpirun inside an allocation: every rank inherits SLURM_LOCALID=0
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    devs = [pick_device("auto", FakeComm(rank=r, size=4, local_rank=r, local_size=4)) for r in range(4)]
    assert devs == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert gpus["set"] == [0, 1, 2, 3]


def test_too_many_ranks_for_the_node_is_refused(gpus):
    with pytest.raises(UserError, match="5 ranks on this node but 4 visible GPUs"):
        pick_device("cuda", FakeComm(rank=4, size=5, local_rank=4, local_size=5))


def test_one_visible_gpu_per_rank_is_index_0(gpus):
    gpus["n"] = 1
    assert pick_device("auto", FakeComm(rank=3, size=4, local_rank=3, local_size=4)) == "cuda:0"


def test_ranks_sharing_a_gpu_are_named(gpus, monkeypatch):
    # ranks 0 and 1 on node n1 each see one device, and it is the same card;
    # every rank sees the same gathered list, so every rank raises
    import socket
    monkeypatch.setattr(socket, "gethostname", lambda: "n1")
    gathered = ["n1/GPU-a", "n1/GPU-a", "n2/GPU-a", "n2/GPU-b"]
    for r in (0, 1):
        with pytest.raises(UserError, match=r"ranks 0, 1 share GPU n1/GPU-a"):
            check_devices_unique("cuda:0", FakeComm(rank=r, size=4, others=gathered))


def test_distinct_gpus_pass(gpus, monkeypatch):
    import socket
    monkeypatch.setattr(socket, "gethostname", lambda: "n1")
    gathered = ["n1/GPU-a", "n1/GPU-b", "n2/GPU-a", "n2/GPU-b"]
    check_devices_unique("cuda:1", FakeComm(rank=1, size=4, others=gathered))


def test_cpu_ranks_are_not_checked():
    check_devices_unique("cpu", FakeComm(rank=0, size=3, others=["", "", ""]))


def test_cpu_when_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", FakeComm()) == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        pick_device("cuda", FakeComm())
