"""Test knobs that change how a rank runs without touching the executor.

`debug.slow_rank=R debug.slow_ms=X` makes rank R a straggler by a known amount: every block of
its stage sleeps X ms in its forward and X ms in its backward. The analysis's straggler blame
(analysis/blame.py) must then put the extra waiting of the other ranks on rank R.
"""
from __future__ import annotations

import math
import time

# action roles (harness.schedule.COMM): what sends, and what blocks until a message arrived
_SENDS = ("send", "isend")
_RECEIVES = ("recv", "wait_recv")


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
    from ..schedule import COMM
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
