"""Interval algebra on many groups at once, vectorised (sort once, sweep once).

Everything here takes flat arrays: a group code per interval (e.g. rank*S + step), start, end.
The union of a group's intervals is found with one sort and a running maximum of ends: a new
segment starts wherever an interval begins after every earlier one (in its group) has ended —
the classic sorted-interval sweep, as HolisticTraceAnalysis does for overlap, without a Python loop.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def factorize(x):
    """np.unique(x, return_inverse=True) -> (sorted distinct values, each one's position in
    them). Integers of a small range (steps, ranks) go through a lookup table: one pass,
    where np.unique hashes or sorts."""
    x = np.asarray(x)
    if x.dtype.kind in "iu" and len(x):
        lo, hi = int(x.min()), int(x.max())
        if hi - lo <= 4 * len(x) + 1024:
            seen = np.zeros(hi - lo + 1, bool)
            seen[x - lo] = True
            pos = np.cumsum(seen) - 1
            return (np.flatnonzero(seen) + lo).astype(x.dtype), pos[x - lo]
    return np.unique(x, return_inverse=True)


def union(group, start, end):
    """Merged segments per group -> (group, seg_start, seg_end), sorted by group then start.

    Empty or inverted intervals (end <= start) are dropped; NaN bounds too.
    """
    g = np.asarray(group, dtype=np.int64)
    s = np.asarray(start, dtype=np.float64)
    e = np.asarray(end, dtype=np.float64)
    ok = e > s  # also False for NaN
    g, s, e = g[ok], s[ok], e[ok]
    if not len(g):
        return g, s, e
    if not _in_order(g, s):   # callers often pass them sorted already: a check is ~10x cheaper
        order = np.lexsort((s, g))
        g, s, e = g[order], s[order], e[order]
    reach = _reach(g, s, e)
    prev = np.empty_like(reach)
    prev[0] = -np.inf
    prev[1:] = reach[:-1]
    new = (s > prev) | np.r_[True, g[1:] != g[:-1]]
    idx = np.flatnonzero(new)
    seg_end = np.maximum.reduceat(e, idx)  # segment end = max end over its intervals
    return g[idx], s[idx], seg_end


def _reach(g, s, e) -> np.ndarray:
    """For intervals sorted by (group, start): a running maximum of ends that gives union()'s
    test (does an interval start after the reach of the ones before it in its group?) the
    same answer as a running maximum within each group, at every interval but a group's
    first (where union() starts a segment regardless).

    One np.maximum.accumulate over the whole array. The value carried into a group from the
    groups before it is harmless where it is at most the end of the group's first interval:
    from the second interval on, the group's own reach is at least that end. The accumulation
    restarts only at the groups it passes (in a rank-major code, each new rank); where those
    are many (groups overlapping in time), pandas' exact per-group maximum."""
    n = len(e)
    first = np.flatnonzero(g[1:] != g[:-1]) + 1           # each group's first interval
    run = np.maximum.accumulate(e)
    reset = first[run[first - 1] > e[first]]             # carried past the first end
    if len(reset) > 64:
        return pd.Series(e).groupby(g).cummax().to_numpy()
    for a, b in zip(reset, np.r_[reset[1:], n]):
        run[a:b] = np.maximum.accumulate(e[a:b])
    return run


def _in_order(g, s) -> bool:
    """Are the intervals sorted by group, then start?"""
    dg = np.diff(g)
    return bool(np.all((dg > 0) | ((dg == 0) & (s[1:] >= s[:-1]))))


def measure(group, start, end, n_groups: int) -> np.ndarray:
    """|union of intervals| per group code 0..n_groups-1 (zeros where a group has none)."""
    return length(union(group, start, end), n_groups)


def length(segments, n_groups: int) -> np.ndarray:
    """Total length per group code of union()'s segments."""
    g, s, e = segments
    return np.bincount(g, weights=e - s, minlength=n_groups)[:n_groups]


def gaps(group, start, end, lo, hi):
    """Complement of each group's union inside [lo[g], hi[g]] -> (group, gap_start, gap_end).

    lo, hi: arrays indexed by group code. Used for idle stretches (no compute) in a window.
    """
    g, s, e = union(group, start, end)
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    n = len(lo)
    # per group: gaps before the first segment, between segments, after the last
    first = np.r_[True, g[1:] != g[:-1]] if len(g) else np.zeros(0, bool)
    last = np.r_[g[1:] != g[:-1], True] if len(g) else np.zeros(0, bool)
    prev_end = np.where(first, lo[g] if len(g) else 0, np.r_[-np.inf, e[:-1]])
    out_g = [g, g[last]]
    out_s = [prev_end, e[last]]
    out_e = [s, hi[g[last]]]
    empty = np.setdiff1d(np.arange(n), g)  # groups with no interval at all: the whole window
    out_g.append(empty)
    out_s.append(lo[empty])
    out_e.append(hi[empty])
    G, S, E = np.concatenate(out_g), np.concatenate(out_s), np.concatenate(out_e)
    S, E = np.maximum(S, lo[G]), np.minimum(E, hi[G])
    keep = E > S
    order = np.lexsort((S[keep], G[keep]))
    return G[keep][order], S[keep][order], E[keep][order]
