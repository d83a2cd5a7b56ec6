"""Straggler blame: whose work made the other ranks wait, per (rank, kind) (pure functions).

Every wait state is caused by another rank being late (Scalasca's wait states, FIELD.md):
- a receive blocked before its matching send began waits [tb, min(send.start, end)] on the
  sender;
- a rendezvous send blocked until its receive was posted waits [tb, min(recv.start, end)] on
  the receiver (analysis.measure.waits).
The cause is what the late rank was doing during that interval, found the way Scalasca's
root-cause analysis propagates waits (Böhme et al. 2010): the part of the interval the late
rank spent computing is blamed on (that rank, the compute kind: fwd, bwd, loss, opt); the
part it spent itself blocked in a wait is passed on, recursively, to whoever it waited for; the
part it spent moving bytes is (that rank, "transfer"); time it ran no span is (that rank,
"other"). So in a 3-stage pipeline whose stage 0 is slow, stage 2's wait for stage 1 is blamed
on stage 0 when stage 1 was itself waiting for stage 0, not on stage 1.

Blame is binned by the step window (metrics.step_windows) the waiting time falls in; a wait of
a receive posted early for the next step counts where it happened. A rank's own waits are never
blamed on itself.
"""
from __future__ import annotations

from bisect import bisect_right

import numpy as np
import pandas as pd

from analysis.measure import intervals as iv
from analysis.measure.critical import RankTimes, paused_gc
from analysis.measure.spill import Spill
from analysis.measure.windows import COMPUTE, windows

_COMPUTE = frozenset(COMPUTE)
MAX_DEPTH = 16  # wait chains longer than the pipeline is deep cannot happen; a guard only


def _waits(rt: RankTimes):
    """Every wait interval, as arrays (victim, w0, w1, cause rank): per rank, its receives'
    and sends' waits for the partner, then its sends still blocked after their receive ended."""
    parts = []
    for r, d in rt.r.items():
        s, e, pt, pr, pend = d["s"], d["e"], d["ptime"], d["prank"], d["pend"]
        what = d["what"]
        is_send = what == "send"
        comm = (is_send | (what == "recv")) & (pr >= 0) & (pt > s)
        w1 = np.minimum(pt[comm], e[comm])
        ok = w1 > s[comm]
        parts.append((r, s[comm][ok], w1[ok], pr[comm][ok]))
        # a send still blocked after its receive completed waits for the receiver's next MPI
        # call (MPICH's shared-memory rendezvous): that, too, the receiver caused
        snd = is_send & (pr >= 0) & (pend < e)
        w0 = np.fmax(np.fmax(pend[snd], s[snd]), pt[snd])   # fmax: a NaN partner time drops out
        ok = e[snd] > w0
        parts.append((r, w0[ok], e[snd][ok], pr[snd][ok]))
    cat = lambda k, dt: np.concatenate([np.zeros(0, dt)] + [np.asarray(p[k], dt)   # noqa: E731
                                                            for p in parts])
    victim = np.concatenate([np.zeros(0, np.int64)]
                            + [np.full(len(p[1]), p[0], np.int64) for p in parts])
    return victim, cat(1, float), cat(2, float), cat(3, np.int64)


def _explain(rt, rank, w0, w1, depth, emit):
    """emit(rank, kind, start, seconds) for what `rank` did during [w0, w1], in time order,
    passing its own waits on (the walk of the module docstring, one span at a time).
    blame() runs it only where _Timeline cannot stand in for it (_Timeline.exact)."""
    d = rt.lists.get(rank)
    if d is None or depth > MAX_DEPTH:
        emit(rank, "wait", w0, w1 - w0)
        return
    S, E, W, PT, PR = d["s"], d["e"], d["what"], d["ptime"], d["prank"]
    i = max(bisect_right(S, w0) - 1, 0)
    t = w0
    n = len(S)
    while t < w1 and i < n:
        s, e = S[i], E[i]
        if e <= t:
            i += 1
            continue
        if s > t:                              # no span between t and s
            x = min(s, w1)
            emit(rank, "other", t, x - t)
            t = x
            continue
        x1 = min(e, w1)
        what = W[i]
        if what in _COMPUTE:
            emit(rank, what, t, x1 - t)
        else:
            pt, pr = PT[i], PR[i]
            wait_end = min(pt, e) if pr >= 0 and pt > s else s
            if t < wait_end:                   # this rank was waiting, too: pass it on
                y = min(wait_end, x1)
                _explain(rt, pr, t, y, depth + 1, emit)
                if y < x1:
                    emit(rank, "transfer", y, x1 - y)
            else:
                emit(rank, "transfer", t, x1 - t)
        t = x1
        i += 1
    if t < w1:
        emit(rank, "other", t, w1 - t)


class _Timeline:
    """One rank's time cut into the pieces _explain walks through, for all queries at once.

    _explain's walk visits the spans whose end beats every earlier end (the running maximum,
    RankTimes' reach), each from where the last one ended: so time is a fixed sequence of
    pieces [lo, hi), each one "other" (no span), a compute kind, "transfer", or passed on to
    a partner rank (the part of a send/recv before its wait ended). Any interval's walk is
    those pieces clipped to it, provided no earlier span overlaps the latest span starting
    at or before the interval's start (the walk starts from that one): `exact`."""

    def __init__(self, d: dict, kinds: dict):
        S, E, reach = d["s"], d["e"], d["reach"]
        self.S, self.reach = S, reach
        prev = np.r_[-np.inf, reach[:-1]]                 # the running maximum before each
        rec = E > prev                                    # spans the walk visits
        cols = (S, E, prev, d["what"], d["prank"], d["ptime"])
        s, e, p, w, pr, pt = cols if rec.all() else (x[rec] for x in cols)
        wc, names = pd.factorize(w)                       # kind codes, local to this rank
        comp = np.isin(names, tuple(_COMPUTE))[wc]
        own = np.array([kinds.setdefault(k, len(kinds)) if k in _COMPUTE else -2
                        for k in names], np.int64)[wc]    # -2: not compute, so transfer
        other, transfer = kinds.setdefault("other", len(kinds)), kinds.setdefault(
            "transfer", len(kinds))
        own[own == -2] = transfer
        cs = np.maximum(s, p)                             # where its piece starts
        with np.errstate(invalid="ignore"):   # a NaN partner time: no wait to pass on
            wait_end = np.where(~comp & (pr >= 0) & (pt > s), np.fmin(pt, e), s)
        # per visited span three pieces: the gap before it, the part passed on, the rest (its
        # own kind, or transfer); empty ones are dropped, and one "other" after the last span
        n = len(s)
        lo, hi = np.empty(3 * n + 1), np.empty(3 * n + 1)
        kind, to = np.empty(3 * n + 1, np.int64), np.empty(3 * n + 1, np.int64)
        lo[0:-1:3], lo[1:-1:3], lo[2:-1:3] = p, cs, np.maximum(cs, wait_end)
        hi[0:-1:3], hi[1:-1:3], hi[2:-1:3] = s, wait_end, e
        kind[0::3], kind[1:-1:3], kind[2:-1:3] = other, -1, own   # -1: passed on to rank `to`
        to[0:-1:3], to[1:-1:3], to[2:-1:3] = pr, pr, pr
        lo[-1], hi[-1], to[-1] = (e[-1] if n else -np.inf), np.inf, -1
        keep = hi > lo
        self.lo, self.hi, self.kind, self.to = lo[keep], hi[keep], kind[keep], to[keep]

    def exact(self, lo):
        """Whether the pieces give _explain's walk for intervals starting at lo."""
        i = np.maximum(np.searchsorted(self.S, lo, "right") - 1, 0)
        return (i == 0) | (self.reach[np.maximum(i - 1, 0)] <= lo)

    def cut(self, lo, hi):
        """The pieces of each interval [lo, hi): (interval, piece, start, end), in time order
        within each interval."""
        j0 = np.searchsorted(self.hi, lo, "right")      # first piece ending after lo
        j1 = np.searchsorted(self.lo, hi, "left")       # pieces starting before hi
        n = np.maximum(j1 - j0, 0)
        q = np.repeat(np.arange(len(lo)), n)
        j = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(j0, n)
        a, b = np.maximum(self.lo[j], lo[q]), np.minimum(self.hi[j], hi[q])
        ok = b > a
        return q[ok], j[ok], a[ok], b[ok]


def _explain_all(rt, cause, lo, hi):
    """_explain for many intervals at once, breadth first (one round per depth) -> arrays
    (interval, rank, kind, start, seconds) of the pieces, plus the kind names (kind codes
    index them)."""
    kinds = {}
    lines = {r: _Timeline(d, kinds) for r, d in rt.r.items()}
    wait = kinds.setdefault("wait", len(kinds))
    out = []   # (interval, rank, kind code, start, seconds) chunks
    slow = []  # pieces of the intervals _explain walks itself
    q, rank = np.arange(len(lo)), np.asarray(cause, np.int64)
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    depth = 1
    while len(q):
        nq, nr, nlo, nhi = [], [], [], []
        for r in np.unique(rank).tolist():
            m = rank == r
            qq, a, b = q[m], lo[m], hi[m]
            tl = lines.get(r)
            if tl is None or depth > MAX_DEPTH:
                out.append((qq, np.full(len(qq), r), np.full(len(qq), wait), a, b - a))
                continue
            ok = tl.exact(a)
            for k in np.flatnonzero(~ok).tolist():   # rare: overlapping spans (clock noise)
                _explain(rt, r, float(a[k]), float(b[k]), depth,
                         lambda rr, kd, t, v, k=int(qq[k]): slow.append((k, rr, kd, t, v)))
            qq, a, b = qq[ok], a[ok], b[ok]
            i, j, s, e = tl.cut(a, b)
            kd = tl.kind[j]
            own = kd >= 0
            out.append((qq[i][own], np.full(own.sum(), r), kd[own], s[own], e[own] - s[own]))
            nq.append(qq[i][~own])
            nr.append(tl.to[j][~own])
            nlo.append(s[~own])
            nhi.append(e[~own])
        if not nq:
            break
        q, rank, lo, hi = (np.concatenate(x) for x in (nq, nr, nlo, nhi))
        depth += 1
    if slow:
        c = list(zip(*slow))
        out.append((np.array(c[0], np.int64), np.array(c[1], np.int64),
                    np.array([kinds.setdefault(k, len(kinds)) for k in c[2]], np.int64),
                    np.array(c[3], float), np.array(c[4], float)))
    cols = [np.concatenate([np.zeros(0)] + [np.asarray(o[k]) for o in out]) for k in range(5)]
    return (cols[0].astype(np.int64), cols[1].astype(np.int64), cols[2].astype(np.int64),
            cols[3], cols[4], list(kinds))


def blame(events: pd.DataFrame, rt: RankTimes | None = None) -> pd.DataFrame:
    """Rows: step, victim, rank (blamed), kind, seconds — one per combination that occurred.
    rt: RankTimes(events), when the caller has it already (the critical path uses the same)."""
    keep = (events["lane"] != "step").to_numpy()
    steps, sc = iv.factorize(events["step"].to_numpy()[keep])
    w0, w1 = windows(sc, len(steps), events["start"].to_numpy()[keep],
                      events["end"].to_numpy()[keep],
                      events["kind"].isin(COMPUTE).to_numpy()[keep])
    rt = rt or RankTimes(events)
    victim, a, b, cause = _waits(rt)
    # each wait cut by the step windows it overlaps (windows in step order; bisect as below
    # needs their ends, and the stop their starts, to be sorted, as steps follow in time)
    k0 = np.searchsorted(w1, a, "right")
    if np.all(np.diff(w0) >= 0) and np.all(np.diff(w1) >= 0):
        k1 = np.maximum(np.searchsorted(w0, b, "left"), k0)
    else:   # the loop's stop: the first window from k0 on that starts at or after b
        k1 = np.array([next((k for k in range(k, len(w0)) if not w0[k] < x), len(w0))
                       for k, x in zip(k0.tolist(), b.tolist())], np.int64)
    n = k1 - k0
    w = np.repeat(np.arange(len(a)), n)                  # wait of each (wait, window)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(k0, n)
    lo, hi = np.maximum(a[w], w0[k]), np.minimum(b[w], w1[k])
    ok = hi > lo
    w, k, lo, hi = w[ok], k[ok], lo[ok], hi[ok]
    with paused_gc():
        q, rank, kind, start, sec, names = _explain_all(rt, cause[w], lo, hi)
    # per (wait-window, rank, kind): its pieces added up in time order (as _explain adds them
    # up into one dict per wait-window): one sequential bincount over time-sorted pieces
    order = np.lexsort((start, q))
    q, rank, kind, sec = q[order], rank[order], kind[order], sec[order]
    ranks, ri = iv.factorize(rank)
    key, g = iv.factorize((q * len(ranks) + ri) * len(names) + kind)
    tot = np.bincount(g, weights=sec, minlength=len(key))
    kq, kr, kk = key // len(names) // len(ranks), ranks[key // len(names) % len(ranks)], \
        key % len(names)
    use = (kr != victim[w][kq]) & (tot > 0)
    cols = ["step", "victim", "rank", "kind", "seconds"]
    if not use.any():   # no wait anywhere: the empty frame, with the columns
        return pd.DataFrame([], columns=cols).groupby(cols[:-1], as_index=False)[cols[-1]].sum()
    df = pd.DataFrame({"step": steps[k][kq][use].astype(np.int64),
                       "victim": victim[w][kq][use].astype(np.int64),
                       "rank": kr[use].astype(np.int64),
                       "kind": np.array(names, dtype=object)[kk[use]].tolist(),
                       "seconds": tot[use].astype(np.float64)})
    return df.groupby(cols[:-1], as_index=False)["seconds"].sum()


def caused_per_step(bl: pd.DataFrame, steps, ranks) -> pd.DataFrame:
    """Idle each rank caused on the others, per step (step x rank, seconds; 0 where none)."""
    t = bl.groupby(["step", "rank"])["seconds"].sum().unstack(fill_value=0.0)
    return t.reindex(index=list(steps), columns=list(ranks), fill_value=0.0).fillna(0.0)


def spill_steady(spill, bl: pd.DataFrame, steady, key: str = "blame") -> None:
    """Keep, for summary(), the steady steps' idle each rank caused, per step in all and by
    kind, where it caused any."""
    b = bl[bl["step"].isin(list(steady))]
    if b.empty:
        return
    caused = b.groupby(["step", "rank"])["seconds"].sum()
    for r, idx in caused.groupby(level=1).indices.items():
        spill.add(f"{key}.caused.{int(r)}", caused.to_numpy()[idx])
    kinds = b.groupby(["step", "rank", "kind"])["seconds"].sum()
    for (r, k), idx in kinds.groupby(level=[1, 2]).indices.items():
        spill.add(f"{key}.kind.{int(r)}.{k}", kinds.to_numpy()[idx])


def summary(bl: pd.DataFrame, steady: list, ranks) -> dict:
    """metrics.json's blame of blame() rows: per rank the median idle it caused per steady
    step (0 in steps where it caused none) and by kind, and the worst offender."""
    spill = Spill()
    spill_steady(spill, bl, steady)
    return summary_from(spill, len(steady), ranks)


def summary_from(spill, steady: int, ranks, key: str = "blame") -> dict:
    """summary() from what spill_steady kept; steady: how many steady steps."""
    med = {r: (spill.median(f"{key}.caused.{r}", steady - spill.count(f"{key}.caused.{r}"))
               if steady else 0.0) for r in ranks}
    head = f"{key}.kind."
    combos = sorted((int(k[len(head):].split(".", 1)[0]), k[len(head):].split(".", 1)[1])
                    for k in spill.keys() if k.startswith(head))
    kmed = {(r, k): spill.median(f"{head}{r}.{k}", steady - spill.count(f"{head}{r}.{k}"))
            for r, k in combos}
    total = float(pd.Series([med[r] for r in ranks], dtype=float).sum())
    per_rank = []
    for r in ranks:
        by_kind = {k: float(v) for (rr, k), v in kmed.items() if rr == r and v > 0}
        per_rank.append({"rank": int(r), "caused_s": float(med.get(r, 0.0)),
                         "share": float(med.get(r, 0.0)) / total if total > 0 else None,
                         "by_kind": dict(sorted(by_kind.items(), key=lambda x: -x[1]))})
    worst = max(per_rank, key=lambda x: x["caused_s"]) if per_rank and total > 0 else None
    return {"per_rank": per_rank, "caused_total_s": total,
            "worst_offender": None if worst is None else {
                "rank": worst["rank"], "caused_s": worst["caused_s"], "share": worst["share"],
                "mostly": next(iter(worst["by_kind"]), None)},
            "definition": "each wait (late sender, late receiver) is blamed on what the late "
                          "rank did meanwhile; its own waits are passed on to whoever it waited "
                          "for (Scalasca root-cause propagation); median per steady step"}
