"""Test knobs (config section debug.*) that change how a rank runs without touching the executor.

They wrap it from outside: `wrap` puts the step-level knobs around the executor's `run_step`
(debug.fail_* raises at the start of a step, debug.stall_* stops communicating for good,
debug.mismatch_* runs a wrong schedule for one step), and `apply` hooks the blocks of a
straggler (debug.slow_*). With every knob off (the default) the executor runs as it is.

`debug.slow_rank=R debug.slow_ms=X` makes rank R a straggler by a known amount: every block of
its stage sleeps X ms in its forward and X ms in its backward. The analysis's straggler blame
(analysis/measure/blame.py) must then put the extra waiting of the other ranks on rank R.
"""
from __future__ import annotations

import math
import time

from ..schedule import COMM

# action roles (harness.schedule.COMM): what sends, and what blocks until a message arrived
_SENDS = ("send", "isend")
_RECEIVES = ("recv", "wait_recv")


def wrap(executor, debug, rank: int):
    """What runs a step (`run_step(step)`): the executor itself or, when a step-level knob of
    `debug` (config.DebugCfg) concerns `rank`, the executor wrapped in them."""
    if rank in (debug.fail_rank, debug.stall_rank, debug.mismatch_rank):
        return Knobs(executor, debug, rank)
    return executor


class Knobs:
    """An executor whose `run_step` first applies this rank's step-level test knobs."""

    def __init__(self, executor, debug, rank: int):
        self.inner, self.rank = executor, rank
        self.fail_step = debug.fail_step if debug.fail_rank == rank else None
        self.stall_step = debug.stall_step if debug.stall_rank == rank else None
        self.mismatch_step = debug.mismatch_step if debug.mismatch_rank == rank else None

    def run_step(self, step: int, actions: list | None = None) -> dict:
        if self.fail_step == step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step} "
                               f"(debug.fail_rank / debug.fail_step)")
        if self.stall_step == step:  # a hung peer: the others' receives must not wait forever
            while True:
                time.sleep(3600)
        if self.mismatch_step == step:  # a hang: this rank's first send moved (mismatch)
            actions = mismatch(self.inner.actions if actions is None else actions)
        return self.inner.run_step(step, actions)


def apply(debug, rank: int, layers) -> int:
    """Install the knobs of `debug` (config.DebugCfg) that concern `rank`; returns the number
    of hooks installed (0 when none applies)."""
    if debug.slow_rank != rank or not debug.slow_ms > 0:
        return 0
    return slow_down(layers, debug.slow_ms / 1e3)


def slow_down(layers, seconds: float) -> int:
    """Sleep `seconds` in each block's forward and again in its backward.

    The executor calls each block as a module, so a forward hook on the block sleeps, then
    registers a hook on the output tensor that sleeps when its gradient arrives: the start of
    that block's backward, inside the rank's backward call (all of which is compute)."""
    assert math.isfinite(seconds) and seconds >= 0

    def on_forward(_module, _inputs, out):
        time.sleep(seconds)
        if out.requires_grad:
            out.register_hook(lambda grad: time.sleep(seconds))

    for blk in layers:
        blk.register_forward_hook(on_forward)
    return len(layers)


def mismatch(actions: list) -> list:
    """`debug.mismatch_rank`: a wrong schedule for one rank, so that the job hangs. Its first
    send (or isend) is moved to just after the next receive that completes (recv or wait_recv):
    on rank 0 of the naive schedule, `fwd0 send_act0 recv_grad0` becomes
    `fwd0 recv_grad0 send_act0`, and rank 0 waits for a gradient while rank 1 waits for the
    activation: a cycle. ValueError when the rank never sends before receiving."""
    role = [COMM[a.kind][1] if a.kind in COMM else None for a in actions]
    i = next((k for k, r in enumerate(role) if r in _SENDS), None)
    j = next((k for k in range(i + 1, len(role)) if role[k] in _RECEIVES), None) \
        if i is not None else None
    if j is None:
        raise ValueError("this rank's schedule has no send followed by a receive, so moving "
                         "its first send cannot make it hang; choose another rank")
    out = list(actions)
    out.insert(j, out.pop(i))
    return out
