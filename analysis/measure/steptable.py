"""The per-(step, rank) table of metrics.json's steps.csv (pure functions of the frames).

Each row: one rank in one step, the quantities metrics.py's docstring defines: span, compute,
send, receive (wait and transfer split, Scalasca), copy, idle (and its split by pipeline phase),
utilisation, overlap, peak activation bytes. All interval arithmetic is vectorised over every
(step, rank) group at once (analysis.measure.intervals).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.measure import intervals as iv, phases as ph, waits
from analysis.measure.live import live_bytes
from analysis.measure.windows import COMPUTE, windows


def step_table(events: pd.DataFrame, pebbles: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (step, rank) that has events: the per-rank metrics of metrics.py's docstring."""
    return _step_table(events, pebbles, waits.recv_split(events), waits.send_split(events))


def _step_table(events, pebbles, rs, ss, lb=None) -> pd.DataFrame:
    """step_table with the run's recv_split and send_split given (summarize has them), and
    live_bytes(pebbles) when the caller has it."""
    # plain arrays of the non-"step" events, each column taken once: a boolean selection of
    # the frame would copy all of its columns, once per lane
    keep = (events["lane"] != "step").to_numpy()
    col = lambda c: events[c].to_numpy()[keep]   # noqa: E731
    step, rank, start, end, tb = col("step"), col("rank"), col("start"), col("end"), col("tb")
    lane = events["lane"]   # compared as a Series: on the loader's categorical, codes compare
    is_lane = {k: (lane == k).to_numpy()[keep] for k in ("send", "recv", "copy")}
    is_comp = events["kind"].isin(COMPUTE).to_numpy()[keep]
    blocked = np.where(np.isnan(tb), start, tb)   # a send/recv's lane span starts at tb
    (steps, si), (ranks, ri) = iv.factorize(step), iv.factorize(rank)
    R, S_ = len(ranks), len(steps)
    n = S_ * R
    # group codes rank-major (rank * S + step): the loader sorts events by (rank, start), so
    # each lane's intervals come already in (group, start) order and intervals.union need
    # not sort; the table's rows are step-major (step * R + rank), hence `rows`
    code = ri * S_ + si
    rows = lambda x: np.asarray(x).reshape(R, S_).T.ravel()   # noqa: E731
    tcode = lambda df: (np.searchsorted(steps, df["step"].to_numpy()) * R   # noqa: E731
                        + np.searchsorted(ranks, df["rank"].to_numpy()))

    def sel(mask, lo):
        return code[mask], lo[mask], end[mask]

    is_comm = is_lane["send"] | is_lane["recv"]
    comp, comm = sel(is_comp, start), sel(is_comm, start)
    out = pd.DataFrame({"step": np.repeat(steps, R), "rank": np.tile(ranks, S_)})
    w0, w1 = windows(si, S_, start, end, is_comp)
    span = w1 - w0
    out["span"] = np.repeat(span, R)
    busy = iv.union(*comp)
    compute = iv.length(busy, n)
    out["compute"] = rows(compute)
    out["send"] = rows(iv.measure(*sel(is_lane["send"], blocked), n))
    out["recv"] = rows(iv.measure(*sel(is_lane["recv"], blocked), n))
    for c in ("wait", "transfer"):
        out["recv_" + c] = np.bincount(tcode(rs), weights=rs[c].fillna(0).to_numpy(),
                                       minlength=n)[:n] if len(rs) else 0.0
    # late receiver (Scalasca), analysis/measure/waits.py
    for c in ("wait", "transfer"):
        out["send_" + c] = np.bincount(tcode(ss), weights=ss[c].fillna(0).to_numpy(),
                                       minlength=n)[:n] if len(ss) else 0.0
    out["copy"] = rows(iv.measure(*sel(is_lane["copy"], blocked), n))
    out["idle"] = out["span"] - out["compute"]
    out["utilisation"] = out["compute"] / out["span"]
    commt = iv.measure(*comm, n)
    # |compute ∩ comm| by inclusion-exclusion (|A| + |B| - |A ∪ B|), with the union of
    # both taken in event order: already sorted, where concatenating the two is not
    both = iv.measure(*sel(is_comp | is_comm, start), n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["overlap_pct"] = rows(np.where(
            commt > 0, np.maximum(compute + commt - both, 0.0) / commt * 100, np.nan))
    # the idle split by pipeline phase (analysis/measure/phases.py); where the rank did no compute,
    # all of its idle is steady
    kind = events["kind"]
    sw = np.tile(np.arange(S_), R)   # each group's step
    split = ph.idle_split(comp[0], n, start[is_comp], end[is_comp],
                          (kind == "bwd").to_numpy()[keep][is_comp],
                          kind.isin(("fwd", "loss")).to_numpy()[keep][is_comp],
                          w0[sw], w1[sw], busy)
    has_comp = np.bincount(comp[0], minlength=n) > 0
    for c in ph.PHASES:
        out["idle_" + c] = rows(np.where(has_comp, split[c], np.nan))
    # present: rows for (step, rank) pairs where the rank actually logged something
    present = np.zeros(n, bool)
    present[code] = True
    at = np.flatnonzero(rows(present))   # the rows kept, as step-major codes
    out = out.iloc[at].reset_index(drop=True)
    for c in ph.PHASES:
        out["idle_" + c] = out["idle_" + c].fillna(out["idle"] if c == "steady" else 0.0)
    out["peak_act_bytes"] = np.nan
    if pebbles is not None and len(pebbles):
        # the highest level right after a store, per (step, rank) of the stored pebble;
        # integers where every row has one, else floats with NaN (as a reindex gives)
        lb = live_bytes(pebbles) if lb is None else lb
        st = lb["store"].to_numpy()
        pstep, prank = lb["step"].to_numpy()[st], lb["rank"].to_numpy()[st]
        i = np.minimum(np.searchsorted(steps, pstep), max(S_ - 1, 0))
        j = np.minimum(np.searchsorted(ranks, prank), max(R - 1, 0))
        ok = (steps[i] == pstep) & (ranks[j] == prank) if n else np.zeros(len(i), bool)
        peak = np.full(n, np.iinfo(np.int64).min)
        np.maximum.at(peak, (i * R + j)[ok], lb["bytes"].to_numpy()[st][ok])
        found = np.zeros(n, bool)
        found[(i * R + j)[ok]] = True
        out["peak_act_bytes"] = peak[at] if found[at].all() else np.where(found[at], peak[at],
                                                                         np.nan)
    return out
