"""Test knobs that change how a rank runs without touching the executor.

`debug.slow_rank=R debug.slow_ms=X` makes rank R a straggler by a known amount: every block of
its stage sleeps X ms in its forward and X ms in its backward. The analysis's straggler blame
(analysis/blame.py) must then put the extra waiting of the other ranks on rank R.
"""
from __future__ import annotations

import math
import time


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
