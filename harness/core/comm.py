"""All MPI traffic of the harness, instrumented in one place.

Inside a training step only point-to-point calls happen (`P2P`): tensors move as raw buffers with
the upper-case mpi4py calls (no pickling), each call is timed on the host clock and traced, and a
watchdog (harness.ops.watchdog) aborts the job if a blocking call outlives `comm.timeout_s`, so a
receive that can never complete does not wait forever. Collectives (`bcast`, `gather`,
`barrier`) and the clock ping-pong are used only outside steps, during setup and teardown.

CUDA tensors go to MPI directly when MPI can take device memory (CUDA-aware), else they are staged
through pinned host memory with the copies traced as `d2h`/`h2d` spans. The CUDA paths are not
verified on hardware (the development machines have no GPU).
"""
from __future__ import annotations

import ctypes
import time

import numpy as np
import torch

from ..trace.clock import best_exchange
# the world and its collectives, re-exported: the harness reaches them as comm.<name>
from .world import (CLOCK_TAG, FILE_TAG, WORLD, abort, allgather, barrier, bcast,  # noqa: F401
                    gather, library, local_rank_size, mpi_takes_cuda, rank_size, recv_bytes,
                    recv_obj, send_bytes, send_obj)


def _wire(t: torch.Tensor):
    """A buffer MPI can read/write without copying: numpy for CPU, the tensor for CUDA."""
    if t.dtype == torch.bfloat16:  # numpy has no bf16: move the same bytes as int16
        t = t.view(torch.int16)
    return t.numpy() if t.device.type == "cpu" else t


class Pending:
    """A posted Isend/Irecv; keeps its buffers alive until `P2P.wait` (MPI requires it)."""
    __slots__ = ("req", "kind", "tensor", "host", "peer", "tag", "step", "mb", "pair", "t0")

    def __init__(self, req, kind, tensor, host, peer, tag, step, mb, pair, t0):
        self.req, self.kind, self.tensor, self.host = req, kind, tensor, host
        self.peer, self.tag, self.step, self.mb, self.pair, self.t0 = peer, tag, step, mb, pair, t0


class Waiter:
    """How a rank waits for a posted MPI request (comm.wait).

    spin: MPI's own blocking call, which busy-polls (MPICH): the completion time is exact, but
      the waiting rank keeps a core busy, which on a shared or SMT CPU slows the rank computing
      next to it.
    sleep: test, spin ~20 µs, then test every poll_us with a sleep in between: frees the core;
      every completion is seen up to ~poll_us (+ the kernel's wake-up) late, also short waits.
    backoff: test for spin_us (short waits, the common case at large m, complete exactly as
      under spin), then sleep between tests, starting at 10 µs and doubling up to poll_us: a long
      wait (naive, warm-up) frees the core after spin_us, and its completion is seen late by at
      most one sleep, ≤ poll_us (+ wake-up).
    Sleeps use the waiting thread's timer slack, which Waiter sets to 1 µs where Linux allows
    (prctl PR_SET_TIMERSLACK; the default 50 µs would make every sleep ≥ ~60 µs)."""

    FIRST_SLEEP_S = 10e-6

    def __init__(self, mode: str = "spin", poll_us: float = 50.0, spin_us: float = 200.0):
        if mode not in ("spin", "sleep", "backoff"):
            raise ValueError(f"comm.wait={mode!r}: allowed spin, sleep, backoff")
        self.mode, self.blocking = mode, mode == "spin"
        self.poll_s, self.spin_s = poll_us * 1e-6, (20.0 if mode == "sleep" else spin_us) * 1e-6
        if not self.blocking:
            _tight_timer_slack()

    def wait(self, req) -> None:
        """Until `req` (an MPI request) completes."""
        clock, test, sleep = time.perf_counter, req.Test, time.sleep
        spin_until = clock() + self.spin_s
        while not test():
            if clock() > spin_until:
                break
        else:
            return
        nap = self.poll_s if self.mode == "sleep" else min(self.FIRST_SLEEP_S, self.poll_s)
        while not test():
            sleep(nap)
            nap = min(nap * 2, self.poll_s)


_SLACK_SET = False


def _tight_timer_slack(ns: int = 1000) -> bool:
    """Linux: the calling thread's timer slack to `ns` (prctl PR_SET_TIMERSLACK = 29), so a short
    sleep lasts what was asked rather than +50 µs. Once (the main thread, which waits); False
    where it cannot."""
    global _SLACK_SET
    if _SLACK_SET:
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _SLACK_SET = libc.prctl(29, ctypes.c_ulong(ns), 0, 0, 0) == 0
    except (OSError, AttributeError):
        _SLACK_SET = False
    return _SLACK_SET


class P2P:
    """Point-to-point tensor transport for one rank, traced and guarded by a watchdog."""

    def __init__(self, tracer, now, watchdog, device, cuda_aware: bool, wait: str = "spin",
                 poll_us: float = 50.0, spin_us: float = 200.0):
        """watchdog: what each blocking call registers with (its `blocked`), so that one that
        outlives `watchdog.timeout_s` ends the job (harness.ops.watchdog)."""
        self.tracer, self.now = tracer, now
        self.waiter = Waiter(wait, poll_us, spin_us)
        self.device, self.cuda_aware = device, cuda_aware
        self.stage_via_host = device.type == "cuda" and not cuda_aware
        self.watchdog = watchdog
        self.timeout_s = watchdog.timeout_s

    # -- device <-> wire ----------------------------------------------------------------------
    def _to_wire(self, t, step, mb):
        """-> (tensor whose memory MPI reads, host copy or None)."""
        t = t.detach().contiguous()
        if t.device.type != "cuda":
            return t, None
        if not self.stage_via_host:
            torch.cuda.current_stream(t.device).synchronize()  # the kernel producing t is done
            return t, None
        t0 = self.now()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t)  # synchronous: returns when the bytes are on the host
        self.tracer.copy(step, mb, "d2h", t0, self.now(), host.numel() * host.element_size())
        return host, host

    def _recv_buffer(self, shape, dtype):
        if self.device.type == "cuda" and self.stage_via_host:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _from_wire(self, buf, step, mb):
        if self.device.type == "cuda" and self.stage_via_host:
            t0 = self.now()
            out = buf.to(self.device)
            torch.cuda.current_stream(self.device).synchronize()
            self.tracer.copy(step, mb, "h2d", t0, self.now(), buf.numel() * buf.element_size())
            return out
        return buf

    def _block(self, what: str, req, blocking, post, info=()) -> tuple[int, int]:
        """Run one blocking operation under the watchdog; -> (start, end) on the trace clock.

        MPI's own blocking call (`blocking()`), or the posted request (`req`, or `post()`)
        completed by the Waiter (comm.wait=sleep|backoff)."""
        # info = (op, peer, tag, pair, step, mb): what the hang report says this rank waits on
        self.watchdog.blocked = (time.monotonic() + self.timeout_s, what, *info)
        t0 = self.now()
        if self.waiter.blocking:
            blocking()
        else:
            self.waiter.wait(req if req is not None else post())
        t1 = self.now()
        self.watchdog.blocked = None
        return t0, t1

    # -- blocking --------------------------------------------------------------------------
    def send(self, t, dst, tag, step, mb, pair):
        wire, _ = self._to_wire(t, step, mb)
        t0, t1 = self._block(f"send {pair} to rank {dst} (tag {tag}, step {step})", None,
                             lambda: WORLD.Send(_wire(wire), dest=dst, tag=tag),
                             lambda: WORLD.Isend(_wire(wire), dest=dst, tag=tag),
                             ("send", dst, tag, pair, step, mb))
        self.tracer.comm(step, mb, "send", t0, t1, t0, dst, tag, wire.numel() * wire.element_size(), pair)

    def recv(self, shape, dtype, src, tag, step, mb, pair):
        buf = self._recv_buffer(shape, dtype)
        t0, t1 = self._block(f"receive {pair} from rank {src} (tag {tag}, step {step})", None,
                             lambda: WORLD.Recv(_wire(buf), source=src, tag=tag),
                             lambda: WORLD.Irecv(_wire(buf), source=src, tag=tag),
                             ("recv", src, tag, pair, step, mb))
        self.tracer.comm(step, mb, "recv", t0, t1, t0, src, tag, buf.numel() * buf.element_size(), pair)
        return self._from_wire(buf, step, mb)

    # -- non-blocking ----------------------------------------------------------------------
    def isend(self, t, dst, tag, step, mb, pair) -> Pending:
        wire, host = self._to_wire(t, step, mb)
        t0 = self.now()
        req = WORLD.Isend(_wire(wire), dest=dst, tag=tag)
        return Pending(req, "send", wire, host, dst, tag, step, mb, pair, t0)

    def irecv(self, shape, dtype, src, tag, step, mb, pair) -> Pending:
        buf = self._recv_buffer(shape, dtype)
        t0 = self.now()
        req = WORLD.Irecv(_wire(buf), source=src, tag=tag)
        return Pending(req, "recv", buf, None, src, tag, step, mb, pair, t0)

    def wait(self, p: Pending):
        """Complete a posted operation; returns the received tensor for a receive."""
        verb = "send" if p.kind == "send" else "receive"
        tb, t1 = self._block(f"wait for {verb} {p.pair} with rank {p.peer} (tag {p.tag}, "
                             f"step {p.step})", p.req, p.req.Wait, None,
                             ("wait_" + p.kind, p.peer, p.tag, p.pair, p.step, p.mb))
        nbytes = p.tensor.numel() * p.tensor.element_size()
        self.tracer.comm(p.step, p.mb, p.kind, p.t0, t1, tb, p.peer, p.tag, nbytes, p.pair)
        return self._from_wire(p.tensor, p.step, p.mb) if p.kind == "recv" else None


def clock_offsets(now, exchanges: int) -> list[dict] | None:
    """Ping-pong every rank with rank 0 (Score-P): rank 0 gets, per rank, the exchange with the
    smallest round trip as {rank, t_local, offset_ns, rtt_ns}; other ranks get None. Collective."""
    rank, size = rank_size()
    ping, stamp = np.zeros(1, np.int64), np.zeros(1, np.int64)
    if rank == 0:
        out = [{"rank": 0, "t_local": now(), "offset_ns": 0, "rtt_ns": 0}]
        for r in range(1, size):
            samples = []
            for _ in range(exchanges):
                t_send = now()
                WORLD.Send(ping, dest=r, tag=CLOCK_TAG)
                WORLD.Recv(stamp, source=r, tag=CLOCK_TAG)
                samples.append((t_send, int(stamp[0]), now()))
            out.append({"rank": r, **best_exchange(samples)})
        return out
    for _ in range(exchanges):
        WORLD.Recv(ping, source=0, tag=CLOCK_TAG)
        stamp[0] = now()
        WORLD.Send(stamp, dest=0, tag=CLOCK_TAG)
    return None
