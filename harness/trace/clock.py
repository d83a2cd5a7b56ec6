"""Clocks and timers: one interface, a host and a CUDA implementation.

All trace times are integer nanoseconds on the rank's monotonic host clock
(`time.perf_counter_ns`, CLOCK_MONOTONIC on Linux, shared by the processes of one host).
CUDA work is timed with events recorded on the stream and mapped onto that clock after the step
with one anchor per step (FIELD.md), never by synchronising after every operation.
"""
from __future__ import annotations

import time


class Clock:
    """The rank's trace clock. `skew_ns`/`drift_ppm` are the documented test knob
    (debug.clock_*): they make this rank's clock run off rank 0's by a known amount, so a test
    can check that the ping-pong estimate recovers it."""

    def __init__(self, skew_ns: int = 0, drift_ppm: float = 0.0):
        self.skew_ns, self.drift = int(skew_ns), drift_ppm * 1e-6
        self.origin = time.perf_counter_ns()
        if skew_ns == 0 and drift_ppm == 0:
            self.now = time.perf_counter_ns  # the common case costs one C call

    def now(self) -> int:
        t = time.perf_counter_ns()
        return t + self.skew_ns + int(self.drift * (t - self.origin))

    def true_offset(self, t_local: int) -> int:
        """What must be added to a local time of this clock to get the unskewed host time
        (for tests of the estimate: the estimate of rank 0 minus this rank should match)."""
        # invert t_local = t + skew + drift*(t - origin)
        t = (t_local - self.skew_ns + self.drift * self.origin) / (1.0 + self.drift)
        return int(round(t - t_local))


def offset_from_pingpong(t_send: int, t_remote: int, t_recv: int) -> tuple[int, int]:
    """One ping-pong exchange -> (offset, round trip), Score-P's estimate.

    The reference rank sends at t_send (its clock), the remote stamps t_remote (its clock) and
    answers, the reply arrives at t_recv. Assuming symmetric latency, the remote stamped at
    reference time t_send + rtt/2, so offset (to add to remote times) = t_send + rtt/2 - t_remote.
    The error is at most rtt/2.
    """
    rtt = t_recv - t_send
    return t_send + rtt // 2 - t_remote, rtt


def best_exchange(samples: list[tuple[int, int, int]]) -> dict:
    """Of several (t_send, t_remote, t_recv) exchanges keep the smallest round trip."""
    t_send, t_remote, t_recv = min(samples, key=lambda s: s[2] - s[0])
    off, rtt = offset_from_pingpong(t_send, t_remote, t_recv)
    return {"t_local": t_remote, "offset_ns": off, "rtt_ns": rtt}


def interpolate_offset(t_local, start: dict, end: dict | None):
    """Offset at local time(s) t_local, linear between the start and end estimates (Score-P).
    Works on numbers and numpy arrays."""
    if end is None or end["t_local"] == start["t_local"]:
        return start["offset_ns"] + 0 * t_local
    slope = (end["offset_ns"] - start["offset_ns"]) / (end["t_local"] - start["t_local"])
    return start["offset_ns"] + slope * (t_local - start["t_local"])


class HostTimer:
    """Timer on the host clock: a mark is the time itself."""
    kind = "perf_counter_ns"

    def __init__(self, clock: Clock):
        self.clock = clock
        self.mark = clock.now

    def begin_step(self):
        pass

    def resolve(self, marks: list) -> list[int]:
        return marks


def event_to_host_ns(h0: int, h1: int, elapsed_ms: float) -> int:
    """Host time of a CUDA event, given the step's anchor: host times h0 and h1 taken just
    before recording the anchor event E0 and just after it completed (so E0 ran in [h0, h1]),
    and the event's time after E0 from `E0.elapsed_time(E)` in milliseconds. Error <= (h1-h0)/2
    plus the event resolution (~0.5 us)."""
    return (h0 + h1) // 2 + int(round(elapsed_ms * 1e6))


class CudaTimer:
    """Timer with CUDA events on the current stream, resolved after the step.

    Not verified on hardware (the development machines have no GPU); the mapping arithmetic is
    `event_to_host_ns`, unit-tested with plain numbers.
    """
    kind = "cuda_event"

    def __init__(self, clock: Clock, device):
        import torch  # only with a CUDA timer: the analysis imports this module without torch
        self.torch, self.clock, self.device = torch, clock, device
        self.anchor = None

    def begin_step(self):
        """Re-anchor once per step: a single anchor for a whole run drifts (FIELD.md)."""
        torch = self.torch
        torch.cuda.synchronize(self.device)
        e0 = torch.cuda.Event(enable_timing=True)
        h0 = self.clock.now()
        e0.record()
        e0.synchronize()
        h1 = self.clock.now()
        self.anchor = (h0, h1, e0)

    def mark(self):
        e = self.torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def resolve(self, marks: list) -> list[int]:
        """Host times of this step's marks; call after the step (synchronises once)."""
        h0, h1, e0 = self.anchor
        self.torch.cuda.synchronize(self.device)
        return [m if isinstance(m, int) else event_to_host_ns(h0, h1, e0.elapsed_time(m))
                for m in marks]
