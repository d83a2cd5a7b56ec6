"""Activation bytes held over time, from the pebbles (pure functions of the frames)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def live_bytes(pebbles: pd.DataFrame) -> pd.DataFrame:
    """Activation bytes held per rank over time: one row per store/free, the level after it.

    Columns: rank, time, bytes, step (step of the pebble stored/freed), store (bool). At equal
    times frees come first, so a buffer handed from one pebble to the next is not counted twice.
    """
    if pebbles.empty:
        return pd.DataFrame({"rank": [], "time": [], "bytes": [], "step": [], "store": []})
    n = len(pebbles)
    freed = pebbles["freed"].notna().to_numpy()
    rank = np.r_[pebbles["rank"].to_numpy(), pebbles["rank"].to_numpy()[freed]]
    t = np.r_[pebbles["stored"].to_numpy(), pebbles["freed"].to_numpy()[freed]]
    b = pebbles["bytes"].to_numpy(np.int64)
    delta = np.r_[b, -b[freed]]
    step = np.r_[pebbles["step"].to_numpy(), pebbles["step"].to_numpy()[freed]]
    store = np.r_[np.ones(n, bool), np.zeros(freed.sum(), bool)]
    order = np.lexsort((store, t, rank))  # store=False (free) sorts before True at a tie
    rank, delta = rank[order], delta[order]
    # the running sum per rank: one cumsum, less each rank's total before its first row
    level = np.cumsum(delta)
    first = np.flatnonzero(np.r_[True, rank[1:] != rank[:-1]])
    level -= np.repeat(level[first] - delta[first], np.diff(np.r_[first, len(rank)]))
    return pd.DataFrame({"rank": rank, "time": t[order], "step": step[order],
                         "store": store[order], "bytes": level})


def memory_by_step(events: pd.DataFrame, pebbles: pd.DataFrame,
                   memory: pd.DataFrame) -> pd.DataFrame:
    """Per (step, rank), what is held when the rank's step ends: activation bytes from pebbles
    (stored by then and not yet freed) and the last memory sample by then, per source.

    Columns: step, rank, end (s), act_bytes, and one column per memory source (e.g. rss).
    This is the "does memory grow step after step" view of the detach lesson."""
    ends = events.loc[events["kind"] == "step", ["step", "rank", "end"]].sort_values("end")
    out = ends.reset_index(drop=True)
    lb = live_bytes(pebbles).sort_values("time")
    act = pd.merge_asof(out, lb[["time", "rank", "bytes"]].rename(columns={"time": "end"}),
                        on="end", by="rank", direction="backward")
    out["act_bytes"] = act["bytes"].fillna(0).to_numpy()
    for src, d in memory.groupby("source"):
        m = pd.merge_asof(out[["end", "rank"]],
                          d[["time", "rank", "bytes"]].rename(columns={"time": "end"})
                          .sort_values("end"), on="end", by="rank", direction="backward")
        out[src] = m["bytes"].to_numpy()
    return out.sort_values(["step", "rank"]).reset_index(drop=True)
