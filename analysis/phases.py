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

from analysis import intervals as iv

COMPUTE = ("fwd", "bwd", "bwd_in", "bwd_w", "loss", "opt")
PHASES = ("warmup", "steady", "cooldown")


def phase_bounds(events: pd.DataFrame, windows: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, rank) with compute: W0, a, b, W1 and the three phase intervals."""
    comp = events[events["kind"].isin(COMPUTE)]
    keys = comp[["step", "rank"]].drop_duplicates().sort_values(["step", "rank"])
    out = keys.reset_index(drop=True)
    w = windows.reindex(out["step"])
    out["W0"], out["W1"] = w["start"].to_numpy(), w["end"].to_numpy()
    a = comp[comp["kind"] == "bwd"].groupby(["step", "rank"])["start"].min()
    b = comp[comp["kind"].isin(("fwd", "loss"))].groupby(["step", "rank"])["end"].max()
    idx = pd.MultiIndex.from_frame(out[["step", "rank"]])
    out["a"] = a.reindex(idx).to_numpy()
    out["b"] = b.reindex(idx).to_numpy()
    out["a"] = out["a"].fillna(out["W1"])
    out["b"] = out["b"].fillna(out["W0"])
    lo, hi = np.minimum(out["a"], out["b"]), np.maximum(out["a"], out["b"])
    out["warmup_lo"], out["warmup_hi"] = out["W0"], lo
    out["steady_lo"], out["steady_hi"] = lo, hi
    out["cooldown_lo"], out["cooldown_hi"] = hi, out["W1"]
    return out


def phase_idle(events: pd.DataFrame, windows: pd.DataFrame) -> pd.DataFrame:
    """Per (step, rank): idle_warmup, idle_steady, idle_cooldown (seconds)."""
    pb = phase_bounds(events, windows)
    comp = events[events["kind"].isin(COMPUTE)]
    key = pd.MultiIndex.from_frame(pb[["step", "rank"]])
    code = key.get_indexer(pd.MultiIndex.from_frame(comp[["step", "rank"]]))
    s, e = comp["start"].to_numpy(), comp["end"].to_numpy()
    n = len(pb)
    out = pb[["step", "rank"]].copy()
    for ph in PHASES:
        lo, hi = pb[f"{ph}_lo"].to_numpy(), pb[f"{ph}_hi"].to_numpy()
        length = np.maximum(0.0, hi - lo)
        ok = code >= 0
        cs = np.clip(s[ok], lo[code[ok]], hi[code[ok]])
        ce = np.clip(e[ok], lo[code[ok]], hi[code[ok]])
        out[f"idle_{ph}"] = length - iv.measure(code[ok], cs, ce, n)
    return out
