"""Critical path across ranks: per step, the chain of work and messages that set its length.

The events form a dependency graph: on one rank each span follows the previous one (a rank
runs one thing at a time), and a receive (or a rendezvous send) cannot finish before its
partner got there (send -> receive edges). The longest path through that graph ends at the
step's last compute and is found by walking it backwards in time (as trace analysers such as
Scalasca and HolisticTraceAnalysis do), from the step window's end W1 (metrics.step_windows)
to its start W0, on the rank whose compute ends last:

- the rank computes at t: that span is on the path; go to its start, same rank;
- the rank is blocked in a receive at t: from the matching send's start on, the message was on
  the wire (transfer, on the receiving rank); if the send started after the rank began to wait
  (late sender), the path moves to the sender at the send's start — what the sender did before
  is what the receiver waited for; otherwise it stays and goes to when the rank began to wait;
  if t is still inside the wait (the send had not started by t), it moves to the sender at t;
- the rank is blocked in a send: the same with the matching receive's post time (late receiver);
  a send still blocked after its receive completed waits for the receiver to call MPI again
  (measured: MPICH's shared-memory rendezvous), so the path moves to the receiver at t;
- the rank runs no span at t (interpreter time between spans): "other", back to the last end;
- a wait whose partner is unknown (its trace is missing): "wait".

Only the blocked part [tb, end] of a send or receive counts (a non-blocking one posted earlier
runs beside compute). The path's segments tile [W0, W1], so their lengths add up to the span.
"""
from __future__ import annotations

import gc
from bisect import bisect_left
from contextlib import contextmanager
from math import isnan

import numpy as np
import pandas as pd

from analysis.metrics import COMPUTE, recv_split, step_windows
from analysis.waits import _lookup, send_split

KINDS = ("compute", "transfer", "wait", "other")


@contextmanager
def paused_gc():
    """The cyclic garbage collector off for a block that makes ~10^5 tuples and frees none of
    them (the walks, blame, the trace's lines): each generation-2 pass would scan every object
    the analysis holds, and they cost more than the walk itself. Restored afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_LISTED = frozenset(("s", "e", "what", "prank", "ptime"))


class RankTimes:
    """Per rank, the spans during which it was busy or blocked, sorted, for lookups by time.

    Each span: start s (tb for send/recv), end e, what (event kind), partner rank and partner
    time (send start for a receive, receive post for a send; NaN if none), event index."""

    def __init__(self, events: pd.DataFrame):
        ev = events.loc[events["kind"].isin(COMPUTE + ("send", "recv")).to_numpy(),
                        ["rank", "kind", "tb", "start", "end", "pair"]]
        rs = recv_split(events).drop_duplicates("pair")
        ss = send_split(events).drop_duplicates("pair")
        kind = ev["kind"]
        s = ev["tb"].where(kind.isin(("send", "recv")), ev["start"]).fillna(ev["start"])
        prank = np.full(len(ev), -1)
        ptime = np.full(len(ev), np.nan)
        pend = np.full(len(ev), np.nan)   # sends: when their receive completed
        for kd, tab, rc, tc in (("recv", rs, "send_rank", "send_start"),
                                ("send", ss, "recv_rank", "recv_start")):
            k = (kind == kd).to_numpy() & ev["pair"].notna().to_numpy()
            tab = tab[tab["pair"].notna()]
            if k.any() and len(tab):
                j = _lookup(tab["pair"], ev.loc[k, "pair"])   # the first row of each pair
                hit = j >= 0
                pr = np.full(len(j), -1)
                pr[hit] = np.nan_to_num(tab[rc].to_numpy(float)[j[hit]], nan=-1)
                prank[k] = pr
                pt = np.full(len(j), np.nan)
                pt[hit] = tab[tc].to_numpy(float)[j[hit]]
                ptime[k] = pt
                if kd == "send":
                    pe = np.full(len(j), np.nan)
                    pe[hit] = tab["recv_end"].to_numpy(float)[j[hit]]
                    pend[k] = pe
        del rs, ss, tab   # GBs at 10 M events: gone before the per-rank tables are built
        df = pd.DataFrame({"rank": ev["rank"].to_numpy(), "s": s.to_numpy(float),
                           "e": ev["end"].to_numpy(float), "what": ev["kind"].to_numpy(),
                           "prank": prank, "ptime": ptime, "pend": pend,
                           "event": ev.index.to_numpy()})
        del ev, s, prank, ptime, pend
        df = df[df["e"] > df["s"]].sort_values(["rank", "s"], kind="stable")
        self.r, self.lists = {}, {}
        for r, d in df.groupby("rank"):
            e = d["e"].to_numpy()
            self.r[int(r)] = {"s": d["s"].to_numpy(), "e": e, "reach": np.maximum.accumulate(e),
                              "what": d["what"].to_numpy(), "prank": d["prank"].to_numpy(),
                              "ptime": d["ptime"].to_numpy(), "pend": d["pend"].to_numpy(),
                              "event": d["event"].to_numpy()}
            # the walks look spans up one at a time: Python lists and bisect do that ~10x
            # faster than numpy scalars. Only what every step of a walk reads becomes a list
            # (a float in a list costs 32 bytes: 1 GB more at 10 M events for the other three,
            # read once a segment or less); reach, pend and event stay arrays
            self.lists[int(r)] = {k: (v.tolist() if k in _LISTED else v)
                                  for k, v in self.r[int(r)].items()}

    def active(self, rank: int, t: float):
        """(index of the span running on `rank` just before t, or None; end of the last span
        before t when none runs)."""
        d = self.lists.get(rank)
        if d is None:
            return None, -np.inf
        i = bisect_left(d["s"], t) - 1
        if i < 0:
            return None, -np.inf
        if d["e"][i] >= t:
            return i, None
        if d["reach"][i] >= t:  # an earlier, longer span covers t (overlap from clock noise)
            j, e = i, d["e"]
            while j >= 0 and not (e[j] >= t):
                j -= 1
            return j, None
        return None, float(d["reach"][i])


def _walk(rt: RankTimes, rank: int, lo: float, hi: float, step: int, segs: list) -> None:
    """Append the segments of one step's path to `segs` (walked back from hi to lo).

    RankTimes.active inlined, with the rank's lists in locals: the walk visits every segment
    of every step, and a call plus dict lookups per segment cost more than the work."""
    t, stuck, n = hi, 0, 0
    compute = frozenset(COMPUTE)
    lists = rt.lists
    d = lists.get(rank)
    if d is not None:
        S, E, R, W, PR, PT, PE, EV = (d["s"], d["e"], d["reach"], d["what"], d["prank"],
                                      d["ptime"], d["pend"], d["event"])
    cur = rank
    while t > lo and n < 1_000_000:
        if rank != cur:
            d, cur = lists.get(rank), rank
            if d is not None:
                S, E, R, W, PR, PT, PE, EV = (d["s"], d["e"], d["reach"], d["what"],
                                              d["prank"], d["ptime"], d["pend"], d["event"])
        n += 1
        # RankTimes.active(rank, t)
        i = bisect_left(S, t) - 1 if d is not None else -1
        if i < 0:
            segs.append((step, rank, "other", "gap", lo, t, -1))   # max(-inf, lo)
            t = lo
            continue
        if not E[i] >= t:
            if R[i] >= t:   # an earlier, longer span covers t (overlap from clock noise)
                while i >= 0 and not (E[i] >= t):
                    i -= 1
            else:
                g0 = max(float(R[i]), lo)
                segs.append((step, rank, "other", "gap", g0, t, -1))
                t = g0
                continue
        s, what, pr, pt = S[i], W[i], PR[i], PT[i]
        if what in compute:
            segs.append((step, rank, "compute", what, max(s, lo), t, int(EV[i])))
            t = s
        elif pr < 0 or isnan(pt):     # no partner, or its time is unknown
            segs.append((step, rank, "wait", what, max(s, lo), t, int(EV[i])))
            t = s
        elif pt >= t or (what == "send" and float(PE[i]) < t):
            # still waiting at t: the partner holds the path. A send still blocked after its
            # receive completed waits for the receiver's next MPI call (MPICH's shared-memory
            # rendezvous completes the send then), so the receiver holds it too
            if stuck > 2:             # no progress (only with broken clocks): give up the edge
                segs.append((step, rank, "wait", what, max(s, lo), t, int(EV[i])))
                t, stuck = s, 0
                continue
            rank, stuck = pr, stuck + 1
            n -= 1                    # the original counted segments, not moves
        else:
            x0 = max(s, pt, lo)
            segs.append((step, rank, "transfer", what, x0, t, int(EV[i])))
            t, stuck = x0, 0
            if pt > s:                # the partner came late: follow it
                rank = pr


def critical_path(events: pd.DataFrame, steps=None, rt: RankTimes | None = None) -> pd.DataFrame:
    """Segments of each step's critical path: step, rank, kind (compute|transfer|wait|other),
    what (event kind, or "gap"), start, end (s), event (row index in events, -1 for gaps).
    rt: RankTimes(events), when the caller has it already (blame uses the same)."""
    # only the columns used: a copy of every column is ~1 GB at 10 M events
    ev = events.loc[(events["lane"] != "step").to_numpy(), ["rank", "step", "kind", "start", "end"]]
    if steps is not None:
        ev_steps = set(steps)
    else:
        ev_steps = set(ev["step"].unique())
    rt = rt or RankTimes(events)
    win = step_windows(ev)
    comp = ev[ev["kind"].isin(COMPUTE)]
    last = comp.loc[comp.groupby("step")["end"].idxmax(), ["step", "rank"]].set_index("step")
    last_rank = dict(zip(last.index.tolist(), last["rank"].tolist()))
    w0 = dict(zip(win.index.tolist(), win["start"].tolist()))
    w1 = dict(zip(win.index.tolist(), win["end"].tolist()))
    segs: list = []
    with paused_gc():
        for st in sorted(ev_steps):
            if st not in last_rank:
                continue
            _walk(rt, int(last_rank[st]), w0[st], w1[st], int(st), segs)
        df = _frame(segs)
    return df.sort_values(["step", "start"], kind="stable", ignore_index=True)


def _frame(segs: list) -> pd.DataFrame:
    """Segment tuples -> frame; column by column (a frame from 10^5 tuples infers each cell)."""
    names = ["step", "rank", "kind", "what", "start", "end", "event"]
    if not segs:
        return pd.DataFrame(segs, columns=names)
    c = list(zip(*segs))
    return pd.DataFrame({"step": np.array(c[0], np.int64), "rank": np.array(c[1], np.int64),
                         "kind": list(c[2]), "what": list(c[3]),
                         "start": np.array(c[4], np.float64), "end": np.array(c[5], np.float64),
                         "event": np.array(c[6], np.int64)})


def composition(path: pd.DataFrame, steps=None) -> pd.DataFrame:
    """Seconds of the path per (step, rank, kind), every combination present (0 if none)."""
    p = path if steps is None else path[path["step"].isin(steps)]
    p = p.assign(d=p["end"] - p["start"])
    return p.groupby(["step", "rank", "kind"])["d"].sum().rename("seconds").reset_index()


def summary(path: pd.DataFrame, steady: list) -> dict:
    """metrics.json's critical_path: median over steady steps of seconds per (rank, kind) and
    per (rank, what), and each as a share of the step's span."""
    p = path[path["step"].isin(steady)]
    if p.empty:
        return {"per_rank_kind": [], "per_rank_what": [], "ranks_on_path": []}
    p = p.assign(d=p["end"] - p["start"])
    span = p.groupby("step")["d"].sum()
    out = {}
    for name, col in (("per_rank_kind", "kind"), ("per_rank_what", "what")):
        t = p.groupby(["step", "rank", col])["d"].sum().unstack(["rank", col], fill_value=0.0)
        med = t.median()
        share = t.div(span, axis=0).median()
        out[name] = [{"rank": int(r), col: k, "seconds": float(med[(r, k)]),
                      "share": float(share[(r, k)])} for r, k in med.index if med[(r, k)] > 0]
    out["span_s"] = float(span.median())
    out["ranks_on_path"] = sorted(int(r) for r in p["rank"].unique())
    out["definition"] = ("per step, the chain of compute spans, in-rank order and send->receive "
                         "edges ending at the step's last compute, walked back from it; "
                         "segments tile the step's span; medians over steady steps")
    return out
