"""The MPI job without torch: the world, its collectives and the object and file messages.

What harness.run needs to validate a configuration and agree on the verdict before it imports
torch (a refused configuration is said in ~0.5 s instead of after torch's ~1 s import), and
what the rest of the harness reaches as harness.core.comm's (which re-exports it)."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

WORLD = MPI.COMM_WORLD
CLOCK_TAG = 32000  # pipeline tags are 2*mb (+1 for gradients), far below this
FILE_TAG = 32001   # the end-of-run file transfer (harness.ops.localdir)


def rank_size() -> tuple[int, int]:
    return WORLD.Get_rank(), WORLD.Get_size()


def local_rank_size() -> tuple[int, int]:
    """Rank and number of ranks on this host (collective: call during setup)."""
    node = WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    out = node.Get_rank(), node.Get_size()
    node.Free()
    return out


def bcast(obj, root=0):
    return WORLD.bcast(obj, root=root)


def allgather(obj):
    return WORLD.allgather(obj)


def gather(obj, root=0):
    return WORLD.gather(obj, root=root)


def barrier():
    WORLD.Barrier()


def send_obj(obj, dst: int):
    WORLD.send(obj, dest=dst, tag=FILE_TAG)


def recv_obj(src: int):
    return WORLD.recv(source=src, tag=FILE_TAG)


def send_bytes(data: bytes, dst: int):
    WORLD.Send(np.frombuffer(data, dtype=np.uint8), dest=dst, tag=FILE_TAG)


def recv_bytes(src: int, n: int) -> bytes:
    buf = np.empty(n, dtype=np.uint8)
    WORLD.Recv(buf, source=src, tag=FILE_TAG)
    return buf.tobytes()


def abort(code: int = 1):
    WORLD.Abort(code)


def library() -> str:
    return " ".join(MPI.Get_library_version().split())[:200]


def mpi_takes_cuda() -> bool:
    """MPI 4.1's memory allocation kinds: a CUDA-aware MPI lists "cuda" (MPICH, Open MPI 5)."""
    try:
        kinds = WORLD.Get_info().get("mpi_memory_alloc_kinds") or ""
    except Exception:  # noqa: BLE001 - an MPI without the key is not CUDA-aware as far as we know
        return False
    return "cuda" in kinds
