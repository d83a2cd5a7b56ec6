"""Interleaved 1F1B (Narayanan et al. 2021, SC'21, Sec. 2.2; Megatron-LM's order).

Each rank holds v >= 2 chunks (pipeline.virtual), placed round-robin ("loop": rank r holds
stages r, r+p, ...), so the pipeline fills and drains v times faster. The generator writes each
rank's compute order; `lower` adds the communication, always non-blocking (lower.py), so a rank
never blocks except on a tensor it needs and a compute order without a cycle cannot deadlock,
which `harness.schedule.simulate.check` confirms for every generated schedule
(tests/test_schedule_zb.py). Theory: registry.py and docs/schedules.md.
"""
from __future__ import annotations

from .ir import BWD, FWD, Action, Placement, Schedule, check_args, check_virtual
from .lower import lower


def warmup(p: int, m: int, v: int, r: int) -> int:
    """Megatron-LM's warm-up forwards on rank r: (p-r-1)·2 + (v-1)·p, at most m·v."""
    return min((p - r - 1) * 2 + (v - 1) * p, m * v)


def interleaved(p: int, m: int, v: int = 2) -> Schedule:
    """Interleaved 1F1B: rank r holds chunks r, r+p, ... (round-robin); virtual microbatch k
    runs chunk (k mod pv) // p of microbatch (k // pv)·p + k mod p forwards, the chunks in
    reverse backwards; warm-up forwards, then one forward one backward, then cool-down."""
    check_args(p, m)
    check_virtual("interleaved", v, v >= 2, "pipeline.virtual >= 2")
    if m % p:
        # Megatron-LM's order runs microbatches in groups of p through every chunk; a partial
        # group would leave a chunk waiting for a microbatch that never comes.
        raise ValueError(f"pipeline.microbatches={m}: schedule='interleaved' needs a multiple of "
                         f"the {p} ranks (microbatches go through the chunks in groups of p)")
    total, orders = m * v, []

    def fwd(k):
        return Action(FWD, (k // (p * v)) * p + k % p, (k % (p * v)) // p)

    def bwd(k):
        return Action(BWD, (k // (p * v)) * p + k % p, v - 1 - (k % (p * v)) // p)
    for r in range(p):
        w = warmup(p, m, v, r)
        order = [fwd(k) for k in range(w)]
        for k in range(total - w):
            order += [fwd(w + k), bwd(k)]
        order += [bwd(k) for k in range(total - w, total)]
        orders.append(order)
    return lower(orders, Placement(p, v), overlap=True)
