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
                        (analysis.predict.calibrate + analysis.whatif.predict): what the simulator
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

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.measure import blame as bl_mod, critical, waits
from analysis.measure.live import live_bytes, memory_by_step
from analysis.measure.spill import Spill
from analysis.measure.steptable import _step_table, step_table
from analysis.measure.waits import clock_check, recv_split
from analysis.measure.windows import COMPUTE, step_windows, steady
from analysis.predict.calibrate import CalStats, combine
from analysis.predict.replay import predict
from harness import schedule as S

# the ground floor's names, for the callers that import them from here
__all__ = ["summarize", "simulated", "bubble_theory", "step_table", "recv_split",
           "step_windows", "steady", "live_bytes", "memory_by_step", "clock_check", "COMPUTE"]


def bubble_theory(name: str, p: int, m: int, virtual: int = 1, times=None) -> float | None:
    """The schedule's closed-form bubble (harness.schedule.bubble) with v = `virtual` chunks
    per rank and, for the split-backward schedules, per-chunk times {fwd, bwd_in, bwd_w}
    (default equal); None for unknown schedules."""
    return S.bubble(name, p, m, virtual, times)


SPLIT = ("zb_h1", "zbv", "dualpipev")   # schedules whose theory takes F/B/W times


def simulated(cal, meta: dict, p: int, error: str | None = None) -> dict:
    """What harness.simulate predicts for this run: the run calibrated on itself (`cal`,
    analysis.predict.calibrate on its steady steps) and its own schedule, m, v and overlap replayed
    (analysis.predict.replay). Also the mean F, B, W times per chunk-microbatch (the layer spans) and
    the zero-bubble theory with them. On failure (e.g. a run without batch size or compute
    events) the values are None and `error` says why."""
    sch = meta.get("schedule") or {}
    name, m = sch.get("name"), int(sch.get("microbatches") or 1)
    v = int(sch.get("virtual") or 1)
    out = {"bubble": None, "step_span_s": None, "idle_per_rank": None, "times_s": None,
           "bubble_theory_measured_times": None, "error": error}
    if error is not None:
        return out
    try:
        cal = combine([cal])
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


# the per-rank columns whose medians over the steady steps metrics.json's per_rank holds
PER_RANK = ["span", "compute", "send", "send_wait", "send_transfer", "recv", "recv_wait",
            "recv_transfer", "copy", "idle", "idle_warmup", "idle_steady", "idle_cooldown",
            "utilisation", "overlap_pct", "peak_act_bytes", "caused_idle"]


@dataclass
class Partial:
    """What a chunk of steps adds to the summary (`partial`); `finish` merges them. Medians
    over the run need values, not medians of parts: those go into the Spill the chunk was
    given. The rest is small: counts, maxima, sets, and the chunk's rows of steps.csv."""
    steps: list                  # the chunk's own steps with events
    table: pd.DataFrame          # their rows of steps.csv (with caused_idle), and w0: each
    #                              step's window start (s), for the trace's per-step tracks
    steady_ranks: set            # ranks with a row in a steady step
    crit: tuple                  # (steady steps on the path, ranks on it)
    clock: list                  # [violations, matched receives, unmatched receives]
    peers: dict                  # waits.spill_clock's
    dev: dict                    # (rank, source) -> the largest memory sample
    cal: CalStats | None         # the chunk's calibration statistics
    cal_error: str | None = None


def partial(events, pebbles, memory, meta: dict, spill, own=None, steady_steps=(),
            critical_path=None, rank_times=None, t_range=(-np.inf, np.inf),
            lb=None) -> Partial:
    """The chunk's share of the summary: its own steps `own` (default: every step of the
    frames) from frames that also hold their neighbours (analysis.read.scan.Chunk). steady_steps:
    the run's steady steps (the run's, not the chunk's: the warm-up step is the run's first
    complete one). critical_path: critical.critical_path(events) for (at least) the own steps
    when the caller has it; rank_times: the critical.RankTimes(events) it was walked on.
    t_range: the chunk's own time range (memory samples in it count here). lb:
    live_bytes(pebbles), when the caller has it."""
    steps_here = sorted(int(s) for s in pd.unique(events["step"]))
    own = steps_here if own is None else sorted(int(s) for s in own)
    steady_set = set(int(x) for x in steady_steps)
    stead = [s for s in own if s in steady_set]
    rs_all, ss_all = recv_split(events), waits.send_split(events)
    table = _step_table(events, pebbles, rs_all, ss_all, lb)
    rt = rank_times or critical.RankTimes(events)   # one lookup table: path and blame
    bl = bl_mod.blame(events, rt)
    ranks = sorted(int(r) for r in table["rank"].unique())
    caused = bl_mod.caused_per_step(bl, sorted(table["step"].unique()), ranks)
    table["caused_idle"] = caused.stack().reindex(
        pd.MultiIndex.from_frame(table[["step", "rank"]])).fillna(0.0).to_numpy()
    table = table[table["step"].isin(own)].reset_index(drop=True)
    win = step_windows(events[(events["lane"] != "step").to_numpy()])
    table["w0"] = win["start"].reindex(table["step"]).to_numpy()
    bl = bl[bl["step"].isin(own)]
    rs = rs_all[rs_all["step"].isin(own)]
    ss = ss_all[ss_all["step"].isin(own)]
    # per steady step: the per-rank quantities, the bubble, the span
    t = table[table["step"].isin(stead)]
    for r, d in t.groupby("rank"):
        for c in PER_RANK:
            spill.add(f"tab.{c}.{int(r)}", d[c].to_numpy(np.float64, na_value=np.nan))
    spill.add("bubble", t.assign(f=t["idle"] / t["span"]).groupby("step")["f"].mean())
    spill.add("span", t.groupby("step")["span"].first())
    path = critical.critical_path(events, stead, rt) if critical_path is None else \
        critical_path[critical_path["step"].isin(stead)].reset_index(drop=True)
    crit = critical.spill_steady(spill, path, stead)
    bl_mod.spill_steady(spill, bl, stead)
    peers = waits.spill_clock(spill, rs)
    clock = [int(rs["violation"].sum()), int(rs["matched"].sum()),
             int((~rs["matched"]).sum())]
    mem = memory[((memory["time"] >= t_range[0]) & (memory["time"] < t_range[1])).to_numpy()]
    dev = {k: int(v) for k, v in mem.groupby(["rank", "source"], observed=True)["bytes"]
           .max().items()} if len(mem) else {}
    cal, err = CalStats(meta, meta.get("run_dir", "run"), spill, steady=steady_steps), None
    try:
        cal.add(events, pebbles, steady_steps, own, rs, ss)
    except Exception as e:   # recorded, not raised: the measured numbers stand without it
        cal, err = None, f"{type(e).__name__}: {e}"
    return Partial(own, table, set(int(r) for r in t["rank"].unique()), crit, clock, peers,
                   dev, cal, err)


def finish(parts: list, meta: dict, steps: list, spill) -> dict:
    """The summary (metrics.json, with per_step: steps.csv's rows) of a run from its chunks'
    partials, in step order; `steps`: the run's complete steps."""
    table = merged_table([p.table for p in parts])
    summary = summary_of(parts, meta, steps, spill, table["rank"].unique())
    summary["per_step"] = _records(table.drop(columns=["w0"]))
    return summary


def merged_table(tables: list) -> pd.DataFrame:
    """Chunks' rows of steps.csv as one table, typed as one pass would have typed it (the peak
    activation bytes stay integers only where every row has one)."""
    t = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return t


def summary_of(parts: list, meta: dict, steps: list, spill, table_ranks) -> dict:
    """Everything of metrics.json but per_step."""
    steps = sorted(steps)
    warm, stead, note = steady(steps)
    sch = meta.get("schedule") or {}
    ranks = sorted(int(r) for r in table_ranks)
    p = int(meta.get("world_size") or len(ranks))
    m, v = int(sch.get("microbatches") or 1), int(sch.get("virtual") or 1)
    steady_ranks = sorted(set().union(*(x.steady_ranks for x in parts)) if parts else set())
    per_rank = []
    theory = (meta.get("pebbles_theory") or {}).get("peak_bytes") or []
    dev = {}
    for x in parts:
        for k, b in x.dev.items():
            dev[k] = max(dev.get(k, b), b)
    for r in steady_ranks:
        row = {c: np.float64(spill.median(f"tab.{c}.{r}")) for c in PER_RANK}
        with np.errstate(divide="ignore", invalid="ignore"):
            row["idle_fraction"] = row["idle"] / row["span"]
        row["peak_act_theory"] = theory[r] if r < len(theory) else np.nan
        per_rank.append({"rank": int(r), **{k: _f(v_) for k, v_ in row.items()},
                         "peak_device_bytes": {s: b for (rr, s), b in sorted(dev.items())
                                               if rr == r}})
    crit_steps = sum(x.crit[0] for x in parts)
    crit_ranks = set().union(*(x.crit[1] for x in parts)) if parts else set()
    peers = {}
    for x in parts:
        peers = waits.merge_peers(peers, x.peers)
    counts = np.sum([x.clock for x in parts], axis=0) if parts else [0, 0, 0]
    est = (meta.get("clock") or {}).get("estimates") or []
    rtt = [e.get("rtt_ns", 0) for e in est]
    errors = [x.cal_error for x in parts if x.cal_error]
    cal = None
    if not errors:
        cal = parts[0].cal
        for x in parts[1:]:
            cal.merge(x.cal)
    sim = simulated(cal, meta, p, errors[0] if errors else None) if parts else simulated(
        None, meta, p, "no steps")
    return {
        "steps": {"complete": steps, "warmup": warm, "steady": stead, "note": note},
        "schedule": {"name": sch.get("name"), "microbatches": sch.get("microbatches"),
                     "overlap": sch.get("overlap"), "stages": p, "virtual": v},
        "pipeline": {
            "step_span_s": _f(spill.median("span")),
            "bubble_measured": _f(spill.median("bubble")),
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
                                 "(analysis.predict.calibrate, analysis.predict.replay)"},
            "bubble_definition": "per step: mean over ranks of idle/span, idle = span - "
                                 "|union of compute spans|, span = last end - first start of "
                                 "compute over all ranks; median over steady steps",
        },
        "per_rank": per_rank,
        "clock": {"uncertainty_s": max(rtt) / 2e9 if rtt else 0.0,
                  "violations": int(counts[0]), "matched_pairs": int(counts[1]),
                  "unmatched_receives": int(counts[2]), **waits.quality(meta, spill, peers)},
        "critical_path": critical.summary_from(spill, crit_steps, crit_ranks),
        "blame": bl_mod.summary_from(spill, len(stead), ranks),
    }


def summarize(events, pebbles, memory, meta: dict, steps: list | None = None,
              critical_path=None, rank_times=None) -> dict:
    """Everything metrics.json holds, of a run held in memory (one chunk: partial and finish).
    `steps`: the complete steps (Run.steps); default all. critical_path:
    analysis.measure.critical.critical_path(events) when the caller has it already (it covers every
    step; the summary takes the steady ones); rank_times: the critical.RankTimes(events) it was
    walked on, if so (the blame reads the same)."""
    all_steps = sorted(int(s) for s in pd.unique(events["step"]))
    steps = sorted(steps if steps is not None else all_steps)
    spill = Spill()
    part = partial(events, pebbles, memory, meta, spill, all_steps, steady(steps)[1],
                   critical_path, rank_times)
    return finish([part], meta, steps, spill)


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
