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
from functools import cached_property
from math import isnan

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis.measure.spill import Spill
from analysis.measure.windows import COMPUTE, step_windows

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
_COMP, _SEND, _RECV = 0, 1, 2   # RankTimes.g["code"]: what a span is, for the lockstep walk
_GAP = -1                       # "what" of a gap segment, among the kinds' codes
_COMPUTE_AT, _TRANSFER_AT, _WAIT_AT, _OTHER_AT = range(len(KINDS))   # a segment's kind in KINDS
VECTOR_MIN = 48   # fewer walks than this go one by one (one numpy pass costs ~50 segments)


def _codes(col: pd.Series) -> tuple:
    """(integer code per row, -1 for NA; the values the codes name): the loader's categoricals
    as they are, any other column factorised."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.codes.to_numpy(), col.cat.categories
    return pd.factorize(col)


def _first(codes: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Per code 0..n-1, the position of the first row with `mask` and that code; -1 if none."""
    pos = np.flatnonzero(mask & (codes >= 0))
    first = np.full(n, -1, dtype=np.int64)
    code, at = np.unique(codes[pos], return_index=True)
    first[code] = pos[at]
    return first


class RankTimes:
    """Per rank, the spans during which it was busy or blocked, sorted, for lookups by time.

    Each span: start s (tb for send/recv), end e, what (event kind), partner rank and partner
    time (send start for a receive, receive post for a send; NaN if none), event index.
    `g`: one table of numpy arrays over all ranks, sorted by (rank, s), with `code` (_COMP,
    _SEND, _RECV) and `kind` (code among `kinds`) besides; `span[rank]`: the rank's rows of it
    (start, stop); `r[rank]`: the rank's arrays (s, e, reach = running max of e, what, prank,
    ptime, pend = when a send's receive completed, event), views into `g`; `lists`: the same
    as Python lists where the one-at-a-time walks read them. `r` and `lists` are built on
    first use (the lockstep walk needs neither; a float in a list costs 32 bytes: GBs at 10 M
    events)."""

    def __init__(self, events: pd.DataFrame):
        kind, kinds = _codes(events["kind"])
        self.kinds = list(kinds)
        self._names = np.array(self.kinds + [None], dtype=object)   # [-1]: an NA kind
        code = np.where(np.isin(self._names, COMPUTE)[kind], _COMP, -1).astype(np.int8)
        for kd, c in (("send", _SEND), ("recv", _RECV)):
            if kd in self.kinds:
                code[kind == self.kinds.index(kd)] = c
        start = events["start"].to_numpy(float)
        end = events["end"].to_numpy(float)
        rank = events["rank"].to_numpy()
        tb = events["tb"].to_numpy(float)
        s = np.where((code > _COMP) & ~np.isnan(tb), tb, start)
        del tb
        keep = np.flatnonzero((code >= 0) & (end > s))
        # stable sort by (rank, s): ties keep the frame's order
        keep = keep[np.lexsort((s[keep], rank[keep]))]
        g = {"rank": rank[keep], "s": s[keep], "e": end[keep], "code": code[keep],
             "kind": kind[keep], "event": events.index.take(keep).to_numpy()}
        del s, kind
        # partners: a receive's is the first send with its pair id, a send's the first receive
        pair, ids = _codes(events["pair"])
        mine_pair = pair[keep]
        g["prank"] = np.full(len(keep), -1, dtype=np.int64)
        g["ptime"] = np.full(len(keep), np.nan)
        g["pend"] = np.full(len(keep), np.nan)   # sends: when their receive completed
        for mine, other in ((_RECV, _SEND), (_SEND, _RECV)):
            k = np.flatnonzero((g["code"] == mine) & (mine_pair >= 0))
            q = _first(pair, code == other, len(ids))[mine_pair[k]]
            k, q = k[q >= 0], q[q >= 0]
            g["prank"][k], g["ptime"][k] = rank[q], start[q]
            if mine == _SEND:
                g["pend"][k] = end[q]
        del pair, mine_pair, code
        ranks, first = np.unique(g["rank"], return_index=True)
        g["reach"] = np.empty(len(keep))
        self.g, self.span = g, {}
        for r, a, b in zip(ranks.tolist(), first.tolist(), np.r_[first[1:], len(keep)].tolist()):
            g["reach"][a:b] = np.maximum.accumulate(g["e"][a:b])
            self.span[r] = (a, b)

    @cached_property
    def r(self) -> dict:
        what = self._names[self.g["kind"]]
        return {r: {k: (what if k == "what" else self.g[k])[a:b]
                    for k in ("s", "e", "reach", "what", "prank", "ptime", "pend", "event")}
                for r, (a, b) in self.span.items()}

    @cached_property
    def lists(self) -> dict:
        # the walks look spans up one at a time: Python lists and bisect do that ~10x faster
        # than numpy scalars. Only what every step of a walk reads becomes a list; reach, pend
        # and event stay arrays (read once a segment or less)
        return {r: {k: (v.tolist() if k in _LISTED else v) for k, v in d.items()}
                for r, d in self.r.items()}

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


def _walk(tables: dict, rank: int, lo: float, t: float, step: int, segs: list, stuck: int = 0,
          n: int = 0) -> None:
    """Append the segments of one step's path to `segs` (walked back from t to lo).

    tables: RankTimes.lists (fast) or RankTimes.r (numpy arrays, bisect reads them too);
    stuck, n: the state of a walk continued from _walk_lockstep. RankTimes.active inlined, with
    the rank's lists in locals: the walk visits every segment of every step, and a call plus
    dict lookups per segment cost more than the work."""
    compute = frozenset(COMPUTE)
    d = tables.get(rank)
    if d is not None:
        S, E, R, W, PR, PT, PE, EV = (d["s"], d["e"], d["reach"], d["what"], d["prank"],
                                      d["ptime"], d["pend"], d["event"])
    cur = rank
    while t > lo and n < 1_000_000:
        if rank != cur:
            d, cur = tables.get(rank), rank
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


def _walk_lockstep(rt: RankTimes, step, rank, lo, t) -> tuple:
    """_walk for many steps at once: each numpy pass takes one move of every walk still going,
    so the Python work is per move of the longest walk, not per segment of all of them.
    Same rules, same floats (only comparisons and max, as there). Returns the segments as
    arrays (step, rank, kind code in KINDS, what: code among rt.kinds or _GAP, start, end,
    event) and the walks left for _walk (fewer than VECTOR_MIN): (step, rank, lo, t, stuck, n)."""
    g = rt.g
    S, E, R, C, K, PR, PT, PE, EV = (g["s"], g["e"], g["reach"], g["code"], g["kind"],
                                     g["prank"], g["ptime"], g["pend"], g["event"])
    stuck = np.zeros(len(step), np.int64)
    n = np.zeros(len(step), np.int64)
    out = []
    while len(step) >= VECTOR_MIN:
        # RankTimes.active: the last span of the walk's rank starting before t (-1: none)
        i = np.full(len(step), -1, np.int64)
        for r, (a, b) in rt.span.items():
            m = np.flatnonzero(rank == r)
            if len(m):
                j = np.searchsorted(S[a:b], t[m]) - 1
                i[m] = np.where(j >= 0, a + j, -1)
        has = i >= 0
        ic = np.maximum(i, 0)
        on = has & (E[ic] >= t)
        cover = np.flatnonzero(has & ~on & (R[ic] >= t))
        for w in cover.tolist():   # an earlier, longer span covers t (clock noise): rare
            j = int(i[w])
            while not (E[j] >= t[w]):
                j -= 1
            i[w] = j
        if len(cover):
            on[cover] = True
            ic = np.maximum(i, 0)
        s, c, pr, pt = S[ic], C[ic], PR[ic], PT[ic]
        lo_s = np.maximum(s, lo)
        part = on & (c != _COMP) & (pr >= 0) & ~np.isnan(pt)
        hold = part & ((pt >= t) | ((c == _SEND) & (PE[ic] < t)))
        jump = hold & (stuck <= 2)
        xfer = part & ~hold
        gap = ~on
        x0 = np.maximum(np.maximum(s, pt), lo)
        g0 = np.where(has, np.maximum(R[ic], lo), lo)
        # the segment each walk adds (none for a jump) and where it goes on from
        kind = np.select([gap, xfer, c == _COMP], [_OTHER_AT, _TRANSFER_AT, _COMPUTE_AT],
                         _WAIT_AT)
        seg0 = np.where(gap, g0, np.where(xfer, x0, lo_s))
        t_new = np.where(gap, g0, np.where(xfer, x0, np.where(jump, t, s)))
        add = ~jump
        out.append((step[add], rank[add], kind[add], np.where(gap, _GAP, K[ic])[add],
                    seg0[add], t[add], np.where(gap, -1, EV[ic])[add]))
        n += add
        stuck = np.where(jump, stuck + 1, np.where(xfer | (hold & ~jump), 0, stuck))
        rank = np.where(jump | (xfer & (pt > s)), pr, rank)
        t = t_new
        go = (t > lo) & (n < 1_000_000)
        step, rank, lo, t, stuck, n = step[go], rank[go], lo[go], t[go], stuck[go], n[go]
    return out, list(zip(step.tolist(), rank.tolist(), lo.tolist(), t.tolist(), stuck.tolist(),
                         n.tolist()))


def critical_path(events: pd.DataFrame, steps=None, rt: RankTimes | None = None) -> pd.DataFrame:
    """Segments of each step's critical path: step, rank, kind (compute|transfer|wait|other),
    what (event kind, or "gap"), start, end (s), event (row index in events, -1 for gaps).
    rt: RankTimes(events), when the caller has it already (blame uses the same)."""
    use = (events["lane"] != "step").to_numpy()
    # only the columns used: a copy of every column is ~1 GB at 10 M events
    ev = pd.DataFrame({c: events[c].to_numpy()[use] for c in ("rank", "step", "start", "end")})
    ev["kind"] = events["kind"].array[use]
    ev_steps = set(steps) if steps is not None else set(ev["step"].unique())
    rt = rt or RankTimes(events)
    win = step_windows(ev)
    comp = ev["kind"].isin(COMPUTE).to_numpy()
    # the rank whose compute ends last (the first such row)
    at = pd.Series(ev["end"].to_numpy()[comp]).groupby(ev["step"].to_numpy()[comp]).idxmax()
    last_rank = dict(zip(at.index.tolist(), ev["rank"].to_numpy()[comp][at.to_numpy()].tolist()))
    del ev, comp
    w0 = dict(zip(win.index.tolist(), win["start"].tolist()))
    w1 = dict(zip(win.index.tolist(), win["end"].tolist()))
    walks = [(int(st), int(last_rank[st]), w0[st], w1[st]) for st in sorted(ev_steps)
             if st in last_rank]
    segs: list = []
    parts: list = []
    with paused_gc():
        if len(walks) >= VECTOR_MIN:
            st, rk, lo, hi = (np.array(c) for c in zip(*walks))
            parts, walks = _walk_lockstep(rt, st.astype(np.int64), rk.astype(np.int64),
                                          lo.astype(float), hi.astype(float))
            tables = rt.r        # a few walks left: not worth building the lists
        else:
            tables = rt.lists
            walks = [(st, rk, lo, hi, 0, 0) for st, rk, lo, hi in walks]
        for st, rk, lo, t, stuck, n in walks:
            _walk(tables, rk, lo, t, st, segs, stuck, n)
        return _frame(segs, parts, rt.kinds)


def _frame(segs: list, parts: list, kinds: list) -> pd.DataFrame:
    """Segments (tuples from _walk, arrays from _walk_lockstep) -> frame sorted by (step,
    start); column by column (a frame from 10^5 tuples infers each cell)."""
    names = ["step", "rank", "kind", "what", "start", "end", "event"]
    if not segs and not parts:
        return pd.DataFrame(segs, columns=names)
    cols = [list(c) for c in zip(*parts)] or [[] for _ in names]
    if segs:
        c = list(zip(*segs))
        kind_code = {k: i for i, k in enumerate(KINDS)}
        what_code = {k: i for i, k in enumerate(kinds)}
        what_code["gap"] = _GAP
        for j, x in enumerate(c):
            if j == 2:
                x = [kind_code[k] for k in x]
            elif j == 3:
                x = [what_code[k] for k in x]
            cols[j].append(np.array(x))
    step, rank, kind, what, start, end, event = (np.concatenate(c) for c in cols)
    # a walk's segments tile its step back in time: (step, start) is unique, so this order is
    # the same whichever walk made which segment
    order = np.lexsort((start, step))
    return pd.DataFrame({
        "step": step[order].astype(np.int64), "rank": rank[order].astype(np.int64),
        # text as pandas takes it from pyarrow: str (pandas 3) or object, as from a list
        "kind": pa.array(KINDS).take(kind[order]).to_pandas(),
        "what": pa.array(list(kinds) + ["gap"]).take(what[order] % (len(kinds) + 1)).to_pandas(),
        "start": start[order].astype(np.float64), "end": end[order].astype(np.float64),
        "event": event[order].astype(np.int64)})


def composition(path: pd.DataFrame, steps=None) -> pd.DataFrame:
    """Seconds of the path per (step, rank, kind), every combination present (0 if none)."""
    p = path if steps is None else path[path["step"].isin(steps)]
    p = p.assign(d=p["end"] - p["start"])
    return p.groupby(["step", "rank", "kind"])["d"].sum().rename("seconds").reset_index()


def spill_steady(spill, path: pd.DataFrame, steady, key: str = "crit") -> tuple[int, set]:
    """Keep, for summary(), the steady steps' per-step quantities of the path: its length, and
    seconds (and share of the length) per (rank, kind) and per (rank, what) where they occur.
    -> (how many steps, the ranks on the path)."""
    p = path[path["step"].isin(list(steady))]
    if p.empty:
        return 0, set()
    p = p.assign(d=p["end"] - p["start"])
    span = p.groupby("step")["d"].sum()
    spill.add(f"{key}.span", span.to_numpy())
    for name, col in (("kind", "kind"), ("what", "what")):
        t = p.groupby(["step", "rank", col])["d"].sum()
        steps = t.index.get_level_values(0)
        share = t.to_numpy() / span.reindex(steps).to_numpy()
        for (r, k), idx in t.groupby(level=[1, 2]).indices.items():
            spill.add(f"{key}.{name}.{int(r)}.{k}", t.to_numpy()[idx])
            spill.add(f"{key}.{name}share.{int(r)}.{k}", share[idx])
    return len(span), set(int(r) for r in p["rank"].unique())


def summary(path: pd.DataFrame, steady: list) -> dict:
    """metrics.json's critical_path: median over steady steps of seconds per (rank, kind) and
    per (rank, what), and each as a share of the step's span (0 in the steps where a
    combination does not occur)."""
    spill = Spill()
    return summary_from(spill, *spill_steady(spill, path, steady))


def summary_from(spill, steps: int, ranks: set, key: str = "crit") -> dict:
    """summary() from what spill_steady kept: steps, ranks as it returned them, added up."""
    if not steps:
        return {"per_rank_kind": [], "per_rank_what": [], "ranks_on_path": []}
    out = {}
    for name, col in (("per_rank_kind", "kind"), ("per_rank_what", "what")):
        head = f"{key}.{col}."
        combos = sorted((int(k[len(head):].split(".", 1)[0]), k[len(head):].split(".", 1)[1])
                        for k in spill.keys() if k.startswith(head))
        rows = []
        for r, k in combos:
            c = f"{head}{r}.{k}"
            zeros = steps - spill.count(c)
            med = spill.median(c, zeros)
            if med > 0:
                rows.append({"rank": r, col: k, "seconds": float(med),
                             "share": float(spill.median(f"{key}.{col}share.{r}.{k}", zeros))})
        out[name] = rows
    out["span_s"] = float(spill.median(f"{key}.span"))
    out["ranks_on_path"] = sorted(ranks)
    out["definition"] = ("per step, the chain of compute spans, in-rank order and send->receive "
                         "edges ending at the step's last compute, walked back from it; "
                         "segments tile the step's span; medians over steady steps")
    return out
