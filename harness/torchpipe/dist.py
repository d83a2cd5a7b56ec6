"""The run's own collectives over torch.distributed, for a job that torchrun started.

Our session, failure policy and clocks talk to the other ranks through a handful of calls
(harness.core.comm: bcast, allgather, gather, barrier, clock_offsets, abort, library); under
mpirun they are MPI's. A job started by torchrun has no MPI world (each process would be a world
of its own), so `DistComm` offers the same calls over a gloo group of its own, beside the default
group that PyTorch's pipeline uses: our messages never share a queue or a tag with the
pipeline's, and go only where the pipeline does not (set-up, clock exchanges, the end).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from ..trace.clock import best_exchange


class DistComm:
    """harness.core.comm's control-plane calls on a gloo group of all ranks (made here,
    collectively: every rank constructs one, after init_process_group)."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def rank_size(self) -> tuple[int, int]:
        return self.rank, self.size

    @staticmethod
    def local_rank_size() -> tuple[int, int]:
        return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))

    def bcast(self, obj, root: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=root, group=self.group)
        return box[0]

    def allgather(self, obj) -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj, root: int = 0):
        out = [None] * self.size if self.rank == root else None
        dist.gather_object(obj, out, dst=root, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    @staticmethod
    def abort(code: int = 1):
        """End this process now. torchrun's agent sees a worker exit non-zero and stops the
        others (SIGTERM), which is how a torchrun job comes down."""
        sys.stderr.flush()
        os._exit(code)

    @staticmethod
    def library() -> str:
        return f"gloo (torch.distributed, torch {torch.__version__}; started by torchrun)"

    def clock_offsets(self, now, exchanges: int) -> list[dict] | None:
        """harness.core.comm.clock_offsets over this group: rank 0 ping-pongs each rank and
        keeps the exchange with the smallest round trip (Score-P). Collective."""
        ping, stamp = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            out = [{"rank": 0, "t_local": now(), "offset_ns": 0, "rtt_ns": 0}]
            for r in range(1, self.size):
                samples = []
                for _ in range(exchanges):
                    t_send = now()
                    dist.send(ping, dst=r, group=self.group)
                    dist.recv(stamp, src=r, group=self.group)
                    samples.append((t_send, int(stamp[0]), now()))
                out.append({"rank": r, **best_exchange(samples)})
            return out
        for _ in range(exchanges):
            dist.recv(ping, src=0, group=self.group)
            stamp[0] = now()
            dist.send(stamp, dst=0, group=self.group)
        return None
