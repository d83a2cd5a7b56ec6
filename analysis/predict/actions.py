"""A run's measured spans as the schedule's actions: what the calibration (analysis/predict/calibrate.py)
takes its costs from.

- `action_times`: one row per compute action (fwd incl. the loss, bwd incl. the loss backward,
  opt incl. the statistics `norms`, bwd_in, bwd_w): its wall time (first span's start to last
  span's end) and busy time (the sum of its spans: the layers, what the bubble counts as
  compute); the difference is the interpreter's time between layers.
- `layer_times`: per (step, layer, action kind) the spans' total time and count: each block's
  own cost, which composes into a stage of any split (the loss is layer L).
- `action_gaps`: every action of the schedule matched to its measured start and end (a
  blocking call [t0, t1], a non-blocking post the point t0, its wait [tb, t1]), and the gap
  before it: the time the executor spends between the end of the rank's previous action and
  the start of this one (Python, bookkeeping, MPI calls' set-up), named by the transition
  (previous kind, kind), which differs a lot between transitions (4 µs from a wait to the next
  wait, 65 µs from a backward to the next receive, measured on the development VM).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.measure.stages import layer_chunk
from harness import schedule as S

# event kind -> the schedule action it belongs to (the loss runs inside the last stage's fwd
# and bwd actions, the statistics after opt)
ACTION_OF = {"fwd": "fwd", "loss": "fwd", "bwd": "bwd", "opt": "opt", "norms": "opt",
             "bwd_in": "bwd_in", "bwd_w": "bwd_w"}


def action_of(kinds) -> np.ndarray:
    """The action kind of each event kind ('' for events that are no compute)."""
    codes, uniq = pd.factorize(np.asarray(kinds, dtype=object))   # each distinct kind once
    return np.array([ACTION_OF.get(k, "") for k in uniq] + [""], dtype=object)[codes]


def action_times(events: pd.DataFrame, steps, meta: dict | None = None) -> pd.DataFrame:
    """One row per (rank, step, mb, chunk, kind) action of the given steps: s, e (first start,
    last end of its spans), busy (sum of its spans), wall = e - s, spans (how many), seconds.
    opt/norms have mb -1. chunk: the rank's model chunk (from meta's split; 0 without meta
    or with one chunk)."""
    codes, kinds = pd.factorize(events["kind"])
    # the action of each event kind, mapped once per distinct kind, grouped by the actions'
    # codes in name order (so the rows come in the order grouping by name gives)
    act = [ACTION_OF.get(k, "") for k in kinds]
    names = sorted(set(a for a in act if a))
    k_of = np.array([names.index(a) if a else -1 for a in act] + [-1], np.int64)
    k = k_of[codes]                        # code -1 (an empty kind) takes the last slot
    use = (k >= 0) & np.isin(events["step"].to_numpy(), np.asarray(list(steps)))
    col = lambda c: events[c].to_numpy()[use]   # noqa: E731
    rank, step, mb, k = col("rank"), col("step"), col("mb"), k[use]
    start, end = col("start"), col("end")
    chunk = layer_chunk(meta, col("layer")) if meta else np.zeros(len(rank), int)
    cols = ["rank", "step", "mb", "chunk", "kind", "s", "e", "busy", "wall", "spans"]
    if not len(rank):
        return pd.DataFrame({c: [] for c in cols})
    # one sort by (rank, step, mb, chunk, action), stable: groups in the order groupby gives
    keys = (rank, step, mb, chunk, k)
    order = np.lexsort(keys[::-1])
    srt = [x[order] for x in keys]
    first = np.flatnonzero(np.r_[True, np.any([x[1:] != x[:-1] for x in srt], axis=0)])
    s_, e_, d_ = start[order], end[order], (end - start)[order]
    out = pd.DataFrame({"rank": srt[0][first], "step": srt[1][first], "mb": srt[2][first],
                        "chunk": srt[3][first],
                        "kind": np.array(names, dtype=object)[srt[4][first]],
                        "s": np.minimum.reduceat(s_, first), "e": np.maximum.reduceat(e_, first),
                        "busy": np.add.reduceat(d_, first)})
    out["wall"] = out["e"] - out["s"]
    out["spans"] = np.diff(np.r_[first, len(order)])
    return out


def layer_times(events: pd.DataFrame, steps) -> pd.DataFrame:
    """Per (step, layer, kind) of the given steps' compute spans: busy (their total seconds)
    and n (how many spans: one per action that ran the layer). kind: the action kind (the
    loss forward is layer L's fwd; a stage-level span, per-layer tracing off, has layer -1;
    a split backward's W is one span per chunk, on the chunk's first layer)."""
    act = action_of(events["kind"].astype(object).to_numpy())
    use = (act != "") & (act != "opt") & np.isin(events["step"].to_numpy(),
                                                 np.asarray(list(steps)))
    ev = pd.DataFrame({"step": events["step"].to_numpy()[use],
                       "layer": events["layer"].to_numpy()[use], "kind": act[use],
                       "d": (events["end"] - events["start"]).to_numpy()[use]})
    g = ev.groupby(["step", "layer", "kind"], sort=True)["d"]
    return pd.DataFrame({"busy": g.sum(), "n": g.size()}).reset_index()


def schedule_table(sched) -> pd.DataFrame:
    """One row per action of every rank: rank, i (its position), kind, mb, chunk, and for a
    communication action its side (send|recv), phase (post: a blocking call or a non-blocking
    post; wait) and tag (the MPI tag its events carry: harness.schedule.message)."""
    pl = S.placement_of(sched)
    rows = []
    for r, acts in enumerate(sched):
        for i, a in enumerate(acts):
            side, phase, tag = "", "compute", -1
            if a.kind in S.COMM:
                role = S.COMM[a.kind][1]
                side = "send" if S.sending(a.kind) else "recv"
                phase = "wait" if role.startswith("wait") else "post"
                tag = S.message(a.kind, r, 0, a.mb, a.chunk, pl)[1]
            rows.append((r, i, a.kind, a.mb, a.chunk, side, phase, tag))
    return pd.DataFrame(rows, columns=["rank", "i", "kind", "mb", "chunk", "side", "phase",
                                       "tag"])


def action_gaps(events: pd.DataFrame, acts: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Every action of the steps in `acts` (action_times) and `events` (their send and
    receive events), matched to the schedule (`table`: schedule_table) -> rank, step, i, kind,
    prev (the rank's previous action kind), start, end, gap = start - the previous action's
    end (seconds). A step's first action has no previous action (prev '', gap NaN): it
    follows the step's bookkeeping, not the schedule.

    The matches are the inner joins of the measured rows with the table's on (rank, kind, mb,
    chunk) for compute and (rank, side, tag) for communication, in the order a join gives
    them (each measured row in its order, its matches in the table's), looked up in dicts of
    the table's few hundred rows: a third of the time of three pandas merges on the small
    frames a calibration sees per chunk."""
    comp, post, wait = {}, {}, {}
    for r, i, k, mb, c, side, phase, tag in zip(*(table[x].tolist() for x in (
            "rank", "i", "kind", "mb", "chunk", "side", "phase", "tag"))):
        if phase == "compute":
            comp.setdefault((r, k, mb, c), []).append((i, k))
        else:
            (post if phase == "post" else wait).setdefault((r, side, tag), []).append((i, k))
    ev = events[events["lane"].isin(("send", "recv")).to_numpy()]
    keys = list(zip(ev["rank"].tolist(), ev["kind"].astype(str).tolist(), ev["tag"].tolist()))
    ca, ci, ck = _join(zip(*(acts[x].tolist() for x in ("rank", "kind", "mb", "chunk"))), comp)
    pe, pi, pk = _join(keys, post)
    we, wi, wk = _join(keys, wait)
    s_, e_ = (acts[x].to_numpy(np.float64) for x in ("s", "e"))
    t0, t1, tb = (ev[x].to_numpy(np.float64) for x in ("start", "end", "tb"))
    e_rank, e_step = ev["rank"].to_numpy(), ev["step"].to_numpy()
    # a compute action: its first span's start to its last span's end; a blocking call
    # [t0, t1], a non-blocking post the point t0; a wait [tb, t1]
    blocking = np.array([not S.COMM[k][1].startswith("i") for k in pk], bool)
    start = np.concatenate([s_[ca], t0[pe], tb[we]])
    end = np.concatenate([e_[ca], np.where(blocking, t1[pe], t0[pe]), t1[we]])
    rank, step = (np.concatenate([acts[c].to_numpy()[ca], x[pe], x[we]]).astype(np.int64)
                  for c, x in (("rank", e_rank), ("step", e_step)))   # (acts may be empty)
    i = np.concatenate([ci, pi, wi])
    kind = np.concatenate([ck, pk, wk])
    order = np.lexsort((i, step, rank))      # stable: a tie keeps the joins' order
    out = pd.DataFrame({"rank": rank[order], "step": step[order], "i": i[order],
                        "kind": kind[order], "start": start[order], "end": end[order]})
    same = (out["rank"].to_numpy()[1:] == out["rank"].to_numpy()[:-1]) & \
           (out["step"].to_numpy()[1:] == out["step"].to_numpy()[:-1]) & \
           (out["i"].to_numpy()[1:] == out["i"].to_numpy()[:-1] + 1)
    prev = np.r_[False, same][:len(out)]      # (no row: no previous action either)
    kinds = out["kind"].to_numpy(object)
    out["prev"] = np.where(prev, np.r_[[""], kinds[:-1]], "")
    out["gap"] = np.where(prev, out["start"].to_numpy() - np.r_[np.nan, out["end"].to_numpy()[:-1]],
                          np.nan)
    return out


def _join(keys, lookup: dict) -> tuple:
    """An inner join of rows (their keys, in order) with a table's rows grouped by key
    (`lookup`: key -> [(i, kind)] in the table's order) -> (row number, i, kind) per match,
    in the order pandas' merge gives them."""
    rows, ii, kk = [], [], []
    for n, key in enumerate(keys):
        for i, k in lookup.get(key, ()):
            rows.append(n)
            ii.append(i)
            kk.append(k)
    return np.asarray(rows, np.int64), np.asarray(ii, np.int64), np.asarray(kk, object)
