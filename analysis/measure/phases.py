"""A rank's bubble split by pipeline phase: warm-up, steady, cool-down (pure functions).

For one step of one rank, on the step's window [W0, W1] (metrics.step_windows: first start to
last end of the step's compute over all ranks), with
    a = start of the rank's first backward in the step (kind bwd),
    b = end of the rank's last forward in the step (kinds fwd and loss):
    warm-up   = [W0, min(a, b)]    before the rank's backward work begins
    steady    = [min(a, b), max(a, b)]
    cool-down = [max(a, b), W1]    after the rank's last forward ended
and the idle of each phase = its length - |the rank's compute spans of the step within it|.
The three idles add up to the rank's idle (span - compute). In 1F1B a < b: steady is the
one-forward-one-backward stretch. In GPipe and naive every forward ends before the first
backward (b < a), so "steady" is the turn-around between the last forward and the first
backward: the rank waits for the gradient to come back through the pipeline. A rank with no
backward in the step has a = W1; one with no forward has b = W0.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.measure import intervals as iv
from harness import runformat

COMPUTE = runformat.COMPUTE
PHASES = ("warmup", "steady", "cooldown")


def phase_idle(events: pd.DataFrame, windows: pd.DataFrame) -> pd.DataFrame:
    """Per (step, rank): idle_warmup, idle_steady, idle_cooldown (seconds)."""
    keys, code, (start, end, bwd, fwd) = _compute_arrays(events)
    w = windows.reindex(keys["step"])
    idle = idle_split(code, len(keys), start, end, bwd, fwd, w["start"].to_numpy(),
                      w["end"].to_numpy(), iv.union(code, start, end))
    return keys.assign(**{f"idle_{ph}": v for ph, v in idle.items()})


def _compute_arrays(events: pd.DataFrame):
    """The compute events: their (step, rank) pairs in order (a frame), each event's row in it,
    and as arrays start, end, is a backward, is a forward or the loss."""
    kind = events["kind"]
    comp = kind.isin(COMPUTE).to_numpy()
    ranks, ri = iv.factorize(events["rank"].to_numpy()[comp])
    R = max(len(ranks), 1)
    key, code = iv.factorize(events["step"].to_numpy()[comp] * R + ri)   # by step, then rank
    keys = pd.DataFrame({"step": key // R, "rank": ranks[key % R]})
    return keys, code, (events["start"].to_numpy()[comp], events["end"].to_numpy()[comp],
                        (kind == "bwd").to_numpy()[comp],
                        kind.isin(("fwd", "loss")).to_numpy()[comp])


def first_last(code, n, start, end, bwd, fwd, w0, w1):
    """Per group 0..n-1 of a (step, rank)'s compute spans: a = the first backward's start
    (w1 without one), b = the last forward's or loss's end (w0 without one)."""
    a, b = np.full(n, np.nan), np.full(n, np.nan)
    np.fmin.at(a, code[bwd], start[bwd])
    np.fmax.at(b, code[fwd], end[fwd])
    return np.where(np.isnan(a), w1, a), np.where(np.isnan(b), w0, b)


def bounds(w0, w1, a, b) -> dict:
    """{phase: (lo, hi)} from the step window [w0, w1] and a, b (module docstring)."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return {"warmup": (w0, lo), "steady": (lo, hi), "cooldown": (hi, w1)}


def idle_split(code, n, start, end, bwd, fwd, w0, w1, segments) -> dict:
    """{phase: idle seconds per group 0..n-1}. code, start, end, bwd, fwd: the compute spans
    (first_last); w0, w1: each group's step window; segments: iv.union(code, start, end).
    A phase's busy time is the union's segments clipped to it: the segments are disjoint, so
    clipped they stay the union of the clipped spans, and no second union is needed."""
    a, b = first_last(code, n, start, end, bwd, fwd, w0, w1)
    g, s, e = segments
    out = {}
    for ph, (lo, hi) in bounds(w0, w1, a, b).items():
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        busy = np.maximum(0.0, np.minimum(e, hi[g]) - np.maximum(s, lo[g]))
        out[ph] = np.maximum(0.0, hi - lo) - np.bincount(g, weights=busy, minlength=n)[:n]
    return out
