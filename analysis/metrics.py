"""What naive model parallelism costs, as pure functions of the loaded frames (no file I/O).

Definitions (FIELD.md; one line each in docs/analysis.md). All times in seconds.
- span of a step      = last end - first start over the step's compute spans on all ranks
                        (FIELD.md's definition taken over compute: a receive for step k is
                        posted as soon as its rank finishes step k-1, while upstream ranks are
                        still in step k-1, so counting it would make consecutive steps overlap
                        and inflate idle time by the upstream's backward)
- compute (busy)      = |union of the rank's compute-lane spans (fwd, bwd, loss, opt)| in the step
- idle                = span - compute;   utilisation = compute / span
- bubble (measured)   = mean over ranks of idle / span, per step
- bubble (theory)     = harness.schedule.bubble with the run's p, m and pipeline.virtual v
                        (naive (p-1)/p; GPipe and 1F1B (p-1)/(m+p-1); interleaved
                        (p-1)/(v·m+p-1); ZB-H1, ZB-V: docs/schedules.md) — equal per-stage
                        times, and for ZB-H1/ZB-V equal F, B, W times, assumed
- bubble (theory, measured F/B/W) = the same formula with the run's mean forward, input- and
                        weight-gradient times per chunk-microbatch (split-backward schedules:
                        what the zero-bubble paper reports, computed from averaged timings)
- bubble (simulated)  = harness.simulate replaying the run's own schedule with the run's own
                        per-stage, per-chunk action times, gaps and message times
                        (analysis.calibrate + analysis.whatif.predict): what the simulator
                        predicts for this run
- send                = |union of [tb, end] of sends| (time the rank was blocked sending)
- receive wait        = Scalasca late sender: max(0, min(s.start, r.end) - r.tb)
- receive transfer    = r.end - max(r.tb, s.start), clipped at 0 (negative only when the clocks
                        break the clock condition, which is counted separately)
- overlap %           = |compute ∩ communication| / |communication| x 100 (HolisticTraceAnalysis),
                        communication = union of send and recv lane spans [start, end]
- peak activations    = max over the step of live pebble bytes (stored, not yet freed)
- clock violations    = receives that end before their matching send started (Scalasca's
                        clock condition), after alignment
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import intervals as iv
from harness import runformat
from harness import schedule as S
from analysis import phases as ph
from analysis import waits

COMPUTE = runformat.COMPUTE  # fwd, bwd, loss, opt, norms (the run's gradient/update statistics)


def recv_split(events: pd.DataFrame) -> pd.DataFrame:
    """Each receive joined to its send on `pair`: wait (late sender) and transfer, in seconds.

    Columns: rank, step, mb, pair, start, end, tb, peer, send_rank, send_start, send_end,
    wait, transfer, matched, violation. Unmatched receives (the sender's trace is missing) get
    NaN wait/transfer.
    """
    m = waits.pair_join(events, "recv", "send")
    tb = m["tb"].fillna(m["start"]).to_numpy()
    s0, r1 = m["send_start"].to_numpy(), m["end"].to_numpy()
    m["wait"] = np.maximum(0.0, np.minimum(s0, r1) - tb)
    m["transfer"] = np.maximum(0.0, r1 - np.maximum(tb, s0))
    m["matched"] = m["send_start"].notna()
    m["violation"] = m["matched"] & (r1 < s0)
    return m


def step_windows(events: pd.DataFrame) -> pd.DataFrame:
    """Per step: first start and last end of compute over all ranks, and span = end - start.
    Steps with no compute at all (a crashed rank's last step) fall back to all their events."""
    steps, code = iv.factorize(events["step"].to_numpy())
    lo, hi = _windows(code, len(steps), events["start"].to_numpy(), events["end"].to_numpy(),
                      events["kind"].isin(COMPUTE).to_numpy())
    w = pd.DataFrame({"start": lo, "end": hi}, index=pd.Index(steps, name="step"))
    w["span"] = w["end"] - w["start"]
    return w


def _windows(code, n, start, end, comp):
    """step_windows on arrays: code = each event's step as 0..n-1 (every one has events),
    comp = is it compute -> (start, end) per step. NaN bounds are skipped, as a groupby
    min/max skips them."""
    has_comp = np.zeros(n, bool)
    has_comp[code[comp]] = True
    use = comp | ~has_comp[code]   # compute, or any event of a compute-less step
    lo, hi = np.full(n, np.nan), np.full(n, np.nan)
    np.fmin.at(lo, code[use], start[use])
    np.fmax.at(hi, code[use], end[use])
    return lo, hi


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


def step_table(events: pd.DataFrame, pebbles: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (step, rank) that has events: the per-rank metrics of the module docstring."""
    return _step_table(events, pebbles, recv_split(events), waits.send_split(events))


def _step_table(events, pebbles, rs, ss) -> pd.DataFrame:
    """step_table with the run's recv_split and send_split given (summarize has them)."""
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
    w0, w1 = _windows(si, S_, start, end, is_comp)
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
    # late receiver (Scalasca), analysis/waits.py
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
    # the idle split by pipeline phase (analysis/phases.py); where the rank did no compute,
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
        lb = live_bytes(pebbles)
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


def bubble_theory(name: str, p: int, m: int, virtual: int = 1, times=None) -> float | None:
    """The schedule's closed-form bubble (harness.schedule.bubble) with v = `virtual` chunks
    per rank and, for the split-backward schedules, per-chunk times {fwd, bwd_in, bwd_w}
    (default equal); None for unknown schedules."""
    return S.bubble(name, p, m, virtual, times)


SPLIT = ("zb_h1", "zbv", "dualpipev")   # schedules whose theory takes F/B/W times


def simulated(events, pebbles, meta: dict, steps) -> dict:
    """What harness.simulate predicts for this run: the run calibrated on itself
    (analysis.calibrate, steady steps) and its own schedule, m, v and overlap replayed
    (analysis.whatif.predict). Also the mean F, B, W times per chunk-microbatch (the layer
    spans) and the zero-bubble theory with them. On failure (e.g. a run without batch size or
    compute events) the values are None and `error` says why."""
    from types import SimpleNamespace

    from analysis.calibrate import calibrate
    from analysis.whatif import predict
    sch = meta.get("schedule") or {}
    name, m = sch.get("name"), int(sch.get("microbatches") or 1)
    v = int(sch.get("virtual") or 1)
    p = int(meta.get("world_size") or events["rank"].nunique())
    out = {"bubble": None, "step_span_s": None, "idle_per_rank": None, "times_s": None,
           "bubble_theory_measured_times": None, "error": None}
    try:
        run = SimpleNamespace(meta=meta, events=events, pebbles=pebbles, steps=list(steps),
                              world_size=p, path=meta.get("run_dir", "run"))
        cal = calibrate([run])
        pred = predict(cal, name, m, overlap=bool(sch.get("overlap")), virtual=v)
    except Exception as e:   # recorded, not raised: the measured numbers stand without it
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    rows = pred.rows
    times = {}
    for k in ("fwd", "bwd", "bwd_in", "bwd_w"):
        x = [cal.cost("busy", r, k, rows, c) for r in range(p) for c in range(v)
             if (r, k) + ((c,) if c else ()) in cal.busy]
        times[k] = float(np.mean(x)) if x else None
    out.update(bubble=pred.bubble, step_span_s=pred.step_s, idle_per_rank=pred.idle,
               times_s=times)
    if name in SPLIT and times["fwd"] and times["bwd_in"] is not None and times["bwd_w"]:
        out["bubble_theory_measured_times"] = bubble_theory(
            name, p, m, v, {k: times[k] for k in ("fwd", "bwd_in", "bwd_w")})
    return out


def steady(steps: list) -> tuple[list, list, str]:
    """(warm-up, steady steps, note): the first step is warm-up unless it is the only one."""
    steps = sorted(steps)
    if not steps:
        return [], [], "no complete step"
    if len(steps) == 1:
        return [], steps, f"only one step ({steps[0]}): used as is, warm-up included"
    return steps[:1], steps[1:], f"median over steps {steps[1]}..{steps[-1]}; step {steps[0]} " \
                                 f"is warm-up and excluded"


def clock_check(meta: dict, rs: pd.DataFrame) -> dict:
    """Alignment uncertainty (max rtt/2 over the estimates, s) and clock-condition violations."""
    est = (meta.get("clock") or {}).get("estimates") or []
    rtt = [e.get("rtt_ns", 0) for e in est]
    return {"uncertainty_s": max(rtt) / 2e9 if rtt else 0.0,
            "violations": int(rs["violation"].sum()), "matched_pairs": int(rs["matched"].sum()),
            "unmatched_receives": int((~rs["matched"]).sum())}


def summarize(events, pebbles, memory, meta: dict, steps: list | None = None,
              critical_path=None, rank_times=None) -> dict:
    """Everything metrics.json holds. `steps`: the complete steps (Run.steps); default all.
    critical_path: analysis.critical.critical_path(events) when the caller has it already
    (it covers every step; the summary takes the steady ones); rank_times: the
    critical.RankTimes(events) it was walked on, if so (the blame reads the same)."""
    rs = recv_split(events)
    table = _step_table(events, pebbles, rs, waits.send_split(events))
    steps = sorted(steps if steps is not None else table["step"].unique())
    warm, stead, note = steady(steps)
    from analysis import blame as bl_mod
    from analysis import critical
    ranks = sorted(int(r) for r in table["rank"].unique())
    rt = rank_times or critical.RankTimes(events)   # one lookup table: path and blame
    bl = bl_mod.blame(events, rt)
    caused = bl_mod.caused_per_step(bl, sorted(table["step"].unique()), ranks)
    table["caused_idle"] = caused.stack().reindex(
        pd.MultiIndex.from_frame(table[["step", "rank"]])).fillna(0.0).to_numpy()
    t = table[table["step"].isin(stead)]
    cols = ["span", "compute", "send", "send_wait", "send_transfer", "recv", "recv_wait",
            "recv_transfer", "copy", "idle", "idle_warmup", "idle_steady", "idle_cooldown",
            "utilisation", "overlap_pct", "peak_act_bytes", "caused_idle"]
    per_rank = t.groupby("rank")[cols].median()
    per_rank["idle_fraction"] = per_rank["idle"] / per_rank["span"]
    theory = (meta.get("pebbles_theory") or {}).get("peak_bytes") or []
    per_rank["peak_act_theory"] = [theory[r] if r < len(theory) else np.nan
                                   for r in per_rank.index]
    dev = memory.groupby(["rank", "source"])["bytes"].max() if len(memory) else pd.Series()
    bubble_step = t.assign(f=t["idle"] / t["span"]).groupby("step")["f"].mean()
    sch = meta.get("schedule") or {}
    p = int(meta.get("world_size") or events["rank"].nunique())
    m, v = int(sch.get("microbatches") or 1), int(sch.get("virtual") or 1)
    sim = simulated(events, pebbles, meta, steps)
    return {
        "steps": {"complete": steps, "warmup": warm, "steady": stead, "note": note},
        "schedule": {"name": sch.get("name"), "microbatches": sch.get("microbatches"),
                     "overlap": sch.get("overlap"), "stages": p, "virtual": v},
        "pipeline": {
            "step_span_s": _f(t.groupby("step")["span"].first().median()),
            "bubble_measured": _f(bubble_step.median()),
            "bubble_theory": bubble_theory(sch.get("name"), p, m, v),
            "bubble_theory_formula": S.BUBBLE_FORMULA.get(sch.get("name")),
            # zero-bubble schedules: the theory with this run's mean F, B, W times
            "bubble_theory_measured_times": sim["bubble_theory_measured_times"],
            "bubble_simulated": _f(sim["bubble"]),
            "step_span_simulated_s": _f(sim["step_span_s"]),
            "simulated": {"idle_per_rank": sim["idle_per_rank"], "times_s": sim["times_s"],
                          "error": sim["error"],
                          "how": "harness.simulate replaying this run's schedule with its own "
                                 "per-chunk action times, gaps and message times "
                                 "(analysis.calibrate, analysis.whatif.predict)"},
            "bubble_definition": "per step: mean over ranks of idle/span, idle = span - "
                                 "|union of compute spans|, span = last end - first start of "
                                 "compute over all ranks; median over steady steps",
        },
        "per_rank": [{"rank": int(r), **{k: _f(v) for k, v in row.items()},
                      "peak_device_bytes": {s: int(b) for (rr, s), b in dev.items() if rr == r}}
                     for r, row in per_rank.iterrows()],
        "clock": {**clock_check(meta, rs), **waits.clock_quality(meta, rs)},
        "critical_path": critical.summary(
            critical.critical_path(events, stead, rt) if critical_path is None else
            critical_path[critical_path["step"].isin(stead)].reset_index(drop=True), stead),
        "blame": bl_mod.summary(bl, stead, ranks),
        "per_step": _records(table),
    }


def _records(table: pd.DataFrame) -> list:
    """table.to_dict("records") with every value through _f, a column at a time."""
    cols = []
    for c in table.columns:
        v = table[c]
        if v.dtype.kind == "f":
            cols.append([None if x != x else x for x in v.tolist()])
        elif v.dtype.kind in "iu":
            cols.append(v.tolist())
        else:
            cols.append([_f(x) for x in v.tolist()])
    names = list(table.columns)
    return [dict(zip(names, row)) for row in zip(*cols)]


def _f(x):
    """JSON-friendly scalar: NaN -> None, numpy -> python."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if np.isnan(x) else float(x)
    return x


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
