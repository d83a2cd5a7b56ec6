"""Clock alignment: each rank's local nanoseconds onto rank 0's clock (Score-P's linear model).

meta.json's clock estimates give, per rank and phase ("start", "end"), the offset to add to the
rank's local time; the analysis keeps per phase the estimate with the smallest round trip and
interpolates linearly between start and end (harness.trace.clock.interpolate_offset), extending
the same line outside them (drift is linear). Aligned times stay integer nanoseconds until they
become float seconds since the run's origin (`secs`): float64 loses nanoseconds past 2^53.
"""
from __future__ import annotations

import numpy as np

from harness.trace.clock import interpolate_offset


def clock_offset_ns(meta: dict, rank: int, t_local: np.ndarray) -> np.ndarray:
    """ns to add to rank `rank`'s local times to get rank 0's clock (Score-P's linear model).

    Uses, per phase, the estimate with the smallest round trip; interpolates linearly between
    "start" and "end" (and extrapolates the same line outside them, since drift is linear);
    one estimate -> a constant offset; none -> 0.
    """
    est = [e for e in (meta.get("clock") or {}).get("estimates") or [] if e.get("rank") == rank]
    best = {}
    for e in est:
        ph = e.get("phase", "start")
        if ph not in best or e.get("rtt_ns", 0) < best[ph].get("rtt_ns", 0):
            best[ph] = e
    pts = [best[ph] for ph in ("start", "end") if ph in best] or list(best.values())[:1]
    if not pts:
        return np.zeros(len(t_local))
    t = np.asarray(t_local, dtype=np.int64)
    return np.asarray(interpolate_offset(t, pts[0], pts[-1] if len(pts) > 1 else None),
                      dtype=np.float64)


def align(meta: dict, rank: int, t) -> np.ndarray:
    """Local int ns -> rank-0 int ns (non-decreasing in t: the offset's slope is a drift of
    parts per million, so the minimum of aligned times is the aligned minimum)."""
    t = np.asarray(t, dtype=np.int64)
    return t + np.rint(clock_offset_ns(meta, rank, t)).astype(np.int64)


def secs(t, origin: int):
    """Aligned ns -> float seconds since origin (NA -> NaN); int64 subtraction first keeps ns."""
    if isinstance(t, np.ndarray):
        return (t - origin) / 1e9
    return ((t - origin).to_numpy(dtype=np.float64, na_value=np.nan)) / 1e9
