"""Straggler blame: whose work made the other ranks wait, per (rank, kind) (pure functions).

Every wait state is caused by another rank being late (Scalasca's wait states, FIELD.md):
- a receive blocked before its matching send began waits [tb, min(send.start, end)] on the
  sender;
- a rendezvous send blocked until its receive was posted waits [tb, min(recv.start, end)] on
  the receiver (analysis.waits).
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

from analysis.critical import RankTimes, paused_gc
from analysis.metrics import COMPUTE, step_windows

_COMPUTE = frozenset(COMPUTE)
MAX_DEPTH = 16  # wait chains longer than the pipeline is deep cannot happen; a guard only


def _waits(rt: RankTimes):
    """Every wait interval: (victim, w0, w1, cause rank)."""
    for r, d in rt.r.items():
        s, e, pt, pr, pend = d["s"], d["e"], d["ptime"], d["prank"], d["pend"]
        comm = np.isin(d["what"], ("send", "recv")) & (pr >= 0) & (pt > s)
        w1 = np.minimum(pt[comm], e[comm])
        ok = w1 > s[comm]
        yield from zip([r] * int(ok.sum()), s[comm][ok].tolist(), w1[ok].tolist(),
                       pr[comm][ok].tolist())
        # a send still blocked after its receive completed waits for the receiver's next MPI
        # call (MPICH's shared-memory rendezvous): that, too, the receiver caused
        snd = (d["what"] == "send") & (pr >= 0) & (pend < e)
        w0 = np.fmax(np.fmax(pend[snd], s[snd]), pt[snd])   # fmax: a NaN partner time drops out
        ok = e[snd] > w0
        yield from zip([r] * int(ok.sum()), w0[ok].tolist(), e[snd][ok].tolist(),
                       pr[snd][ok].tolist())


def _explain(rt, rank, w0, w1, out, depth):
    """Add to out[(rank, kind)] what `rank` did during [w0, w1], passing its own waits on."""
    d = rt.lists.get(rank)
    if d is None or depth > MAX_DEPTH:
        out[(rank, "wait")] = out.get((rank, "wait"), 0.0) + (w1 - w0)
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
            out[(rank, "other")] = out.get((rank, "other"), 0.0) + (x - t)
            t = x
            continue
        x1 = min(e, w1)
        what = W[i]
        if what in _COMPUTE:
            out[(rank, what)] = out.get((rank, what), 0.0) + (x1 - t)
        else:
            pt, pr = PT[i], PR[i]
            wait_end = min(pt, e) if pr >= 0 and pt > s else s
            if t < wait_end:                   # this rank was waiting, too: pass it on
                y = min(wait_end, x1)
                _explain(rt, pr, t, y, out, depth + 1)
                if y < x1:
                    out[(rank, "transfer")] = out.get((rank, "transfer"), 0.0) + (x1 - y)
            else:
                out[(rank, "transfer")] = out.get((rank, "transfer"), 0.0) + (x1 - t)
        t = x1
        i += 1
    if t < w1:
        out[(rank, "other")] = out.get((rank, "other"), 0.0) + (w1 - t)


def blame(events: pd.DataFrame, rt: RankTimes | None = None) -> pd.DataFrame:
    """Rows: step, victim, rank (blamed), kind, seconds — one per combination that occurred.
    rt: RankTimes(events), when the caller has it already (the critical path uses the same)."""
    ev = events.loc[(events["lane"] != "step").to_numpy(), ["kind", "step", "start", "end"]]
    rt = rt or RankTimes(events)
    win = step_windows(ev).sort_index()
    w0, w1 = win["start"].tolist(), win["end"].tolist()
    steps = win.index.tolist()
    rows = []
    with paused_gc():
        for victim, a, b, cause in _waits(rt):
            # the step windows this wait overlaps
            k = bisect_right(w1, a)
            while k < len(steps) and w0[k] < b:
                lo, hi = max(a, w0[k]), min(b, w1[k])
                if hi > lo:
                    out = {}
                    _explain(rt, cause, lo, hi, out, 1)
                    rows += [(int(steps[k]), victim, r, kind, v) for (r, kind), v in out.items()
                             if r != victim and v > 0]
                k += 1
    names = ["step", "victim", "rank", "kind", "seconds"]
    if rows:   # column by column: a frame from 10^5 tuples infers each cell
        c = list(zip(*rows))
        df = pd.DataFrame({"step": np.array(c[0], np.int64), "victim": np.array(c[1], np.int64),
                           "rank": np.array(c[2], np.int64), "kind": list(c[3]),
                           "seconds": np.array(c[4], np.float64)})
    else:
        df = pd.DataFrame(rows, columns=names)
    return df.groupby(["step", "victim", "rank", "kind"], as_index=False)["seconds"].sum()


def caused_per_step(bl: pd.DataFrame, steps, ranks) -> pd.DataFrame:
    """Idle each rank caused on the others, per step (step x rank, seconds; 0 where none)."""
    t = bl.groupby(["step", "rank"])["seconds"].sum().unstack(fill_value=0.0)
    return t.reindex(index=list(steps), columns=list(ranks), fill_value=0.0).fillna(0.0)


def summary(bl: pd.DataFrame, steady: list, ranks) -> dict:
    """metrics.json's blame: per rank the median idle it caused per steady step and by kind,
    and the worst offender."""
    b = bl[bl["step"].isin(steady)]
    per = caused_per_step(b, steady, ranks)
    med = per.median() if len(per) else pd.Series(0.0, index=list(ranks))
    kinds = b.groupby(["step", "rank", "kind"])["seconds"].sum().unstack(["rank", "kind"],
                                                                          fill_value=0.0)
    kinds = kinds.reindex(list(steady), fill_value=0.0)
    kmed = kinds.median() if len(kinds.columns) else pd.Series(dtype=float)
    total = float(med.sum())
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
