"""What a schedule holds: chunk-microbatches in flight and activation bytes, walked from its
action lists (the closed forms beside each schedule are in registry.py)."""
from __future__ import annotations

from .ir import FWD, RELEASES, placement_of


def in_flight(acts: list) -> list:
    """Chunk-microbatches in flight (fwd done, its activations not yet released by bwd or
    bwd_w) after each action of one rank's list."""
    held, out = 0, []
    for a in acts:
        held += (a.kind == FWD) - (a.kind in RELEASES)
        out.append(held)
    return out


def peak_bytes(acts: list, chunk_bytes) -> int:
    """Most activation bytes one rank holds at once, when each chunk-microbatch in flight
    holds chunk_bytes[chunk] (chunks of unequal size weigh what they save)."""
    held = peak = 0
    for a in acts:
        if a.kind == FWD:
            held += chunk_bytes[a.chunk]
        elif a.kind in RELEASES:
            held -= chunk_bytes[a.chunk]
        peak = max(peak, held)
    return peak


def pebble_theory(sched, stage_bytes) -> dict | None:
    """meta.json's `pebbles_theory` from per-global-stage bytes per microbatch (None: no
    formula): per rank the bytes one microbatch leaves through all its chunks, per chunk, and
    the peak, walked from the schedule."""
    if not stage_bytes:
        return None
    pl = placement_of(sched)
    per_chunk = [[stage_bytes[pl.stage(r, c)] for c in range(pl.v)] for r in range(pl.p)]
    return {"bytes_per_microbatch": [sum(b) for b in per_chunk],
            "bytes_per_chunk": per_chunk,
            "peak_bytes": [peak_bytes(acts, b) for acts, b in zip(sched, per_chunk)]}
