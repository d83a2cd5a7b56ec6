"""Synthetic run directories, written exactly as docs/run-format.md says (harness.runformat).

For the analysis tests and benchmarks: runs whose every number is known. Two layers:

- `write_run(path, meta, events=..., pebbles=..., memory=..., stats=..., schedule=...)` writes
  given frames (one row per span/pebble/sample, a `rank` column plus the documented columns,
  times in each rank's *local* integer ns) into a run directory, one file per rank.
- `pipeline_frames(...)` plays a schedule from `harness.schedule` through `harness.simulate`
  (eager messages) on a simple cost model and returns those frames; `make_run(path, ...)` does both. Known clock offsets (with drift) can be
  put on each rank so a test can check that the analysis takes them off again.

Cost model (deliberately simple so tests can compute answers by hand): each layer's forward takes
`t_fwd`, its backward `t_bwd`, the loss `t_loss` forward and `t_loss` backward, `opt` takes
`t_opt`; a send takes `xfer`; a receive posted at c whose send started at s0 ends at
max(c, s0) + xfer (so wait = max(0, s0 - c), transfer = xfer — Scalasca's split).
Split backward (zb_h1, zbv): a layer's input gradient (B) takes `t_bwd_in`, its weight
gradient (W) `t_bwd_w` (default half of `t_bwd` each), the loss backward runs in B, and a
microbatch's pebbles are freed at the end of its W (as the harness does, docs/schedules.md).
Virtual stages (`virtual` > 1): `layers_per_stage` layers per global stage, p·v stages placed as
the schedule says; `meta.split` lists the global stages.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from . import runformat as F
from . import schedule as S
from .schedule import (BWD, BWD_IN, BWD_W, COMM, FWD, OPT, Action, build, message,
                       placement_of, sending, to_json)
from .schedule.simulate import _cost, _run, _static, simulate
from .trace.writer import write_frame

EVENT_COLS, PEBBLE_COLS = list(F.EVENT_COLS), list(F.PEBBLE_COLS)
MEMORY_COLS, STATS_COLS = list(F.MEMORY_COLS), list(F.STATS_COLS)
BASE_NS = 5_000_000_000_000  # a plausible perf_counter_ns() value (~83 min after boot)
MS = 1_000_000


def _csv(df: pd.DataFrame, cols: list) -> str:
    out = df.reindex(columns=cols).copy()
    for c in out.columns:  # nullable ints print as ints, missing as empty (never "nan")
        if out[c].dtype.kind == "f" and c not in ("loss", "grad_norm", "update_norm", "step_time"):
            out[c] = out[c].astype("Int64")
    return out.to_csv(index=False, lineterminator="\n", na_rep="")


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run(path, meta: dict, events=None, pebbles=None, memory=None, stats=None,
              schedule: dict | None = None, *, stats_csv: bool = True, fmt: int = F.FORMAT) -> Path:
    """Write a run directory. Frames need a `rank` column; times are local int ns. fmt 2 (what
    the harness writes): Arrow trace files, a batch per run of rows of one step (memory samples:
    a batch per 25 rows), as the harness flushes them; fmt 1: CSV trace files, as runs written
    before format 2."""
    d = Path(path)
    if fmt != F.FORMAT:   # the run as a harness of that format version wrote it
        meta = dict(meta, format=fmt, trace=dict(meta.get("trace") or {}, format=fmt))
    (d / F.RANKS_DIR).mkdir(parents=True, exist_ok=True)
    (d / F.TRACE_DIR).mkdir(exist_ok=True)
    _atomic(d / "meta.json", json.dumps(meta, indent=1))
    _atomic(d / "config.yaml", f"exp: {meta.get('experiment', 'synthetic')}\n")
    if schedule is not None:
        _atomic(d / "schedule.json", json.dumps(schedule))
    frames = {"events": (events, EVENT_COLS), "pebbles": (pebbles, PEBBLE_COLS),
              "memory": (memory, MEMORY_COLS)}
    for r in range(meta["world_size"]):
        for kind, (df, cols) in frames.items():
            part = df[df["rank"] == r] if df is not None else pd.DataFrame(columns=cols)
            if fmt == 2:
                write_frame(d / F.trace_file(kind, r), kind, r, part, flushes(part))
                continue
            head = F.trace_header(kind, r, fmt)
            (d / F.trace_file(kind, r, 1)).write_text(head + "\n" + _csv(part, cols))
        (d / F.log_file(r)).write_text(f"rank {r}: synthetic run\n")
        if stats is not None:
            (d / F.stats_file(r)).write_text(_csv(stats[stats["rank"] == r], STATS_COLS))
    if stats is not None and stats_csv:
        _atomic(d / "stats.csv", _csv(stats.sort_values(["step", "rank"]), STATS_COLS))
    return d


def flushes(part: pd.DataFrame) -> np.ndarray:
    """Where the harness would have cut a rank's rows into batches: at each change of step
    (memory samples: every 25 rows) -> the batches' end positions."""
    n = len(part)
    if "step" not in part or not n:
        return np.r_[np.arange(25, n, 25), n].astype(np.int64)
    s = part["step"].to_numpy()
    return np.r_[np.flatnonzero(s[1:] != s[:-1]) + 1, n].astype(np.int64)


def make_meta(p: int, layers_per_stage: int, schedule: str = "naive", m: int = 1,
              status: str = "complete", estimates=(), theory=None, width: int = 64,
              batch: int = 32, virtual: int = 1, placement: str = "loop") -> dict:
    """A meta.json dict with every documented key (`split`: one entry per global stage)."""
    L = p * virtual * layers_per_stage
    return {
        "format": F.FORMAT, "experiment": "synthetic", "status": status,
        "error": None if status != "failed" else {"rank": p - 1, "type": "RuntimeError",
                                                  "message": "synthetic failure"},
        "world_size": p, "start_time": "2026-01-01T00:00:00+00:00", "end_time": None,
        "ranks": [{"rank": r, "host": "localhost", "pid": 1000 + r, "device": "cpu",
                   "local_rank": r, "threads": 1, "timer": "perf_counter_ns",
                   "memory_sources": {"rss": "ok", "nvml": "unavailable: no GPU"}}
                  for r in range(p)],
        "model": {"layers": L, "widths": [width] * (L + 1), "batch_size": batch,
                  "dtype": "fp32", "param_counts": [width * width + width] * L},
        "split": [[s * layers_per_stage, (s + 1) * layers_per_stage] for s in range(p * virtual)],
        "schedule": {"name": schedule, "microbatches": m, "overlap": False, "virtual": virtual,
                     "placement": placement},
        "pebbles_theory": theory or {"bytes_per_microbatch": [0] * p, "peak_bytes": [0] * p},
        "trace": {"enabled": True, "format": F.FORMAT, "per_layer": True, "sample_interval_ms": 10},
        "clock": {"method": "ping-pong, minimum round trip (Score-P)", "exchanges": 10,
                  "estimates": list(estimates)},
        "versions": {"python": "3.11", "torch": "synthetic"},
        "mpi_library": "synthetic", "cuda_aware_mpi": False,
    }


def pipeline_frames(p=2, m=1, schedule="naive", steps=3, layers_per_stage=2, *,
                    t_fwd=1 * MS, t_bwd=2 * MS, t_loss=MS // 2, t_opt=MS // 2, xfer=MS // 10,
                    act_bytes=4096, step_gap=MS, sample_ns=MS, rss_base=100 << 20,
                    overlap=False, scale_rows=False, batch=32, virtual=1,
                    t_bwd_in=None, t_bwd_w=None, continuous=False, slow=None,
                    per_row=None, gaps=None, block_times=False) -> dict:
    """Play `schedule` for `steps` steps; return frames in true time (ns) plus meta and schedule.

    Each step is one `harness.simulate` run (eager messages, latency `xfer`, communication calls
    free), laid out on the ranks' clocks and expanded into per-layer spans and pebbles.
    scale_rows: t_fwd, t_bwd, t_loss, xfer and act_bytes are those of the whole batch (m=1) and
    a microbatch of batch/m rows costs 1/m of each (time and memory proportional to rows); the
    pebbles' shapes then lead with the rows. Otherwise every microbatch costs the same.
    virtual: chunks per rank (interleaved, zbv); `layers_per_stage` layers per global stage.
    t_bwd_in, t_bwd_w: a layer's B and W under split backward (default t_bwd / 2 each).
    t_opt: one time for every rank, or one per rank. slow: {step: factor}: that step's actions
    start and end `factor` times later after its start (its spans longer; not continuous).
    continuous: the steps are one simulation, each rank starting its next step as soon as it
    finished its last (no barrier, as the harness runs): the first rank starts step k+1 while
    the last is still in step k, and a receive of step k+1 is posted while the rank it waits
    for is still in step k (step_gap is then not used)."""
    sched = build(schedule, p, m, overlap, virtual=virtual)
    pl = placement_of(sched)
    L = pl.stages * layers_per_stage
    rows = batch // m
    t_bwd_in = t_bwd // 2 if t_bwd_in is None else t_bwd_in
    t_bwd_w = t_bwd - t_bwd // 2 if t_bwd_w is None else t_bwd_w
    given = {FWD: t_fwd, BWD: t_bwd, BWD_IN: t_bwd_in, BWD_W: t_bwd_w, "loss": t_loss}

    def layer_ns(kind, x):          # one layer's (or the loss's) cost at x rows
        t = given[kind] * x // batch if scale_rows else given[kind]
        return t + (per_row or {}).get(kind, 0) * x
    if scale_rows:
        t_fwd, t_bwd, t_bwd_in, t_bwd_w, t_loss, xfer, act_bytes = (
            x // m for x in (t_fwd, t_bwd, t_bwd_in, t_bwd_w, t_loss, xfer, act_bytes))
    shape = f"{rows}x{act_bytes // 4 // rows}" if scale_rows else f"{act_bytes // 4}"
    per_row = per_row or {}
    t_fwd, t_bwd, t_bwd_in, t_bwd_w, t_loss = (
        t + per_row.get(k, 0) * rows for t, k in ((t_fwd, FWD), (t_bwd, BWD), (t_bwd_in, BWD_IN),
                                                 (t_bwd_w, BWD_W), (t_loss, "loss")))
    per_layer = {FWD: t_fwd, BWD: t_bwd, BWD_IN: t_bwd_in, BWD_W: t_bwd_w}

    def last(r, a):       # does this action's chunk hold the loss (the last global stage)?
        return pl.stage(r, a.chunk) == pl.stages - 1

    def cost(r, a):  # ns of one action: its layers (+ the loss forward and backward)
        if a.kind == OPT:
            return t_opt[r] if isinstance(t_opt, (list, tuple)) else t_opt
        if a.kind not in per_layer:
            return 0
        loss = t_loss if last(r, a) and a.kind in (FWD, BWD, BWD_IN) else 0
        return layers_per_stage * per_layer[a.kind] + loss

    gap = None if gaps is None else (lambda r, a, prev: 0 if prev is None else (
        gaps if not isinstance(gaps, dict) else gaps.get((prev.kind, a.kind), 0)))
    ops = simulate(sched, cost, latency=xfer, protocol="eager", gap=gap)
    if continuous:
        per_step = _continuous(sched, pl, steps, m, cost, xfer, gap)
    ev, peb = [], []
    clock = [BASE_NS] * p
    for step in range(steps):
        t_step = max(clock)                  # ranks start the step together
        posted = {}                          # (rank, stream, side, mb, chunk) -> post time
        live = {}                            # (rank, layer, mb, kind) -> pebble row index
        first = {}                           # rank -> its first action's start (continuous)
        f = (slow or {}).get(step, 1.0)      # this step slower (or faster) by this factor
        for o in (per_step[step] if continuous else ops):
            if continuous:                   # times since the run's start, ranks drifting
                t_step = BASE_NS
                first.setdefault(o.rank, BASE_NS + int(o.start))
            r, c, end = o.rank, t_step + int(o.start * f), t_step + int(o.end * f)
            g = pl.stage(r, o.chunk)
            lo, hi = g * layers_per_stage, (g + 1) * layers_per_stage
            if o.kind in COMM:
                stream, role = COMM[o.kind]
                side = "send" if sending(o.kind) else "recv"
                if role in ("isend", "irecv"):               # post only; no time passes
                    posted[r, stream, side, o.mb, o.chunk] = c
                    continue
                t0 = posted.pop((r, stream, side, o.mb, o.chunk), c)
                q, tag, pair = message(o.kind, r, step, o.mb, o.chunk, pl)
                ev.append((r, step, o.mb, -1, side, t0, end, c, q, tag, act_bytes, pair))
                if stream == "act" and side == "recv":       # the received activation is held
                    live[r, lo, o.mb, "recv"] = len(peb)
                    peb.append([r, step, o.mb, lo, "recv", act_bytes, end, None, str(lo),
                                shape, "float32"])
            elif o.kind == FWD:
                for layer in range(lo, hi):
                    ev.append((r, step, o.mb, layer, "fwd", c, c + t_fwd, None, -1, -1, 0, None))
                    live[r, layer, o.mb, "saved"] = len(peb)  # input saved for backward
                    peb.append([r, step, o.mb, layer, "saved", act_bytes, c, None,
                                f"{layer}.linear", shape, "float32"])
                    c += t_fwd
                if g == pl.stages - 1:
                    ev.append((r, step, o.mb, L, "loss", c, c + t_loss, None, -1, -1, 0, None))
                    live[r, L, o.mb, "saved"] = len(peb)
                    peb.append([r, step, o.mb, L, "saved", act_bytes, c, None, "loss",
                                shape, "float32"])
            elif o.kind in (BWD, BWD_IN, BWD_W):
                top = g == pl.stages - 1
                layers = [L] * (top and o.kind != BWD_W) + list(range(hi - 1, lo - 1, -1))
                for layer in layers:
                    d = t_loss if layer == L else per_layer[o.kind]
                    ev.append((r, step, o.mb, layer, o.kind, c, c + d, None, -1, -1, 0, None))
                    c += d
                    if o.kind == BWD:            # a full backward frees layer by layer
                        peb[live.pop((r, layer, o.mb, "saved"))][7] = c
                if o.kind == BWD_W:              # B kept the graph: W's end frees all of it
                    for layer in [L] * top + layers:
                        peb[live.pop((r, layer, o.mb, "saved"))][7] = c
                if o.kind != BWD_IN and (r, lo, o.mb, "recv") in live:
                    peb[live.pop((r, lo, o.mb, "recv"))][7] = c
            elif o.kind == OPT:
                ev.append((r, step, -1, -1, "opt", c, end, None, -1, -1, 0, None))
            clock[r] = end
        for r in range(p):
            ev.append((r, step, -1, -1, "step", first.get(r, t_step), clock[r], None, -1, -1, 0,
                       None))
        clock = [max(clock) + step_gap] * p
    events = pd.DataFrame(ev, columns=["rank"] + EVENT_COLS)
    events = events.sort_values(["rank", "t1"], kind="stable", ignore_index=True)
    pebbles = pd.DataFrame(peb, columns=["rank"] + PEBBLE_COLS)
    # writer order: a pebble's row is written when it is freed (run-format.md)
    pebbles = pebbles.sort_values(["rank", "t_free"], kind="stable", ignore_index=True)
    mem = []
    for r in range(p):
        pr = pebbles[pebbles["rank"] == r]
        t = np.arange(BASE_NS, clock[r] + 1, sample_ns, dtype=np.int64)
        stored = np.sort(pr["t_store"].to_numpy(np.int64))
        freed = np.sort(pr["t_free"].dropna().to_numpy(np.int64))
        live_n = np.searchsorted(stored, t, "right") - np.searchsorted(freed, t, "right")
        mem.append(pd.DataFrame({"rank": r, "t": t, "source": "rss",
                                 "bytes": rss_base + (10 << 20) * r + live_n * act_bytes}))
    loss_rank = pl.where(pl.stages - 1)[0]     # the rank holding the last stage
    stats = pd.DataFrame([(s, r, (2.0 / (s + 1)) if r == loss_rank else np.nan, 1.0 / (s + 1),
                           0.01 / (s + 1), 0.0) for s in range(steps) for r in range(p)],
                         columns=STATS_COLS)
    st = events[events["kind"] == "step"].set_index(["step", "rank"])
    stats["step_time"] = [(st.loc[(s, r), "t1"] - st.loc[(s, r), "t0"]) / 1e9
                          for s, r in zip(stats["step"], stats["rank"])]
    # bytes one microbatch leaves on each global stage (the loss layer L is the last stage's)
    one = pebbles[(pebbles["step"] == 0) & (pebbles["mb"] == 0)]
    g_of = np.minimum(one["layer"].to_numpy() // layers_per_stage, pl.stages - 1)
    stage_bytes = [int(one["bytes"].to_numpy()[g_of == g].sum()) for g in range(pl.stages)]
    theory = S.pebble_theory(sched, stage_bytes)
    meta = make_meta(p, layers_per_stage, schedule, m, theory=theory, batch=batch,
                     virtual=pl.v, placement=pl.style)
    meta["schedule"]["overlap"] = overlap
    if block_times:
        xs = F.block_time_rows(batch, rows)
        for r in range(p):
            chunks = []
            for c in range(pl.v):
                g = pl.stage(r, c)
                top = g == pl.stages - 1
                idx = list(range(g * layers_per_stage, (g + 1) * layers_per_stage)) + [L] * top
                kinds = [FWD] * layers_per_stage + ["loss"] * top
                t = lambda k, x: layer_ns(k, x) / 1e9   # noqa: E731
                chunks.append({"blocks": idx,
                               "fwd": [[t(k, x) for x in xs] for k in kinds],
                               "bwd": [[t(BWD if k == FWD else k, x) for x in xs] for k in kinds],
                               "bwd_in": [t(BWD_IN if k == FWD else k, rows) for k in kinds],
                               "bwd_w": [t(BWD_W, rows) if k == FWD else 0.0 for k in kinds]})
            meta["ranks"][r]["block_times"] = {"rows": xs, "repeats": 1, "chunks": chunks}
    return {"events": events, "pebbles": pebbles, "memory": pd.concat(mem, ignore_index=True),
            "stats": stats, "meta": meta, "schedule": to_json(sched, schedule, m, overlap)}


def _continuous(sched, pl, steps: int, m: int, cost, xfer, gap=None) -> list:
    """`steps` copies of the schedule run back to back on each rank (microbatch k of step s
    simulated as s*m + k), as one harness.simulate run -> per step, its actions (PlannedOp,
    times since the first step's start) with their microbatches of the step."""
    _static(sched)
    multi = S.Schedule([[Action(a.kind, a.mb + k * m if a.mb >= 0 else -1, a.chunk)
                         for k in range(steps) for a in acts] for acts in sched], pl)
    out = [[] for _ in range(steps)]
    opts = {}
    for o in _run(multi, _cost(cost), float(xfer), True, gap):
        if o.mb >= 0:
            k, mb = divmod(o.mb, m)
        else:                                  # a rank's k-th opt ends its step k
            k = opts[o.rank] = opts.get(o.rank, -1) + 1
            mb = -1
        out[k].append(replace(o, mb=mb))
    return out


def skew(frames: dict, clocks: dict) -> dict:
    """Put known clocks on ranks: clocks[rank] = (offset_start_ns, offset_end_ns).

    The rank's local time t satisfies true = t + o(t), o linear in t from o_start at the run's
    first local time to o_end at its last (constant offset plus drift). The matching estimates
    go into meta.clock, so an analysis that interpolates them recovers the true times.
    """
    out = {k: (v.copy() if isinstance(v, pd.DataFrame) else v) for k, v in frames.items()}
    meta = json.loads(json.dumps(frames["meta"]))
    est = []
    t_first = int(frames["events"]["t0"].min())
    t_last = int(frames["events"]["t1"].max())
    for r, (oa, ob) in clocks.items():
        ta, tb = t_first - oa, t_last - ob            # local times of the two estimates
        k = (ob - oa) / (tb - ta)
        for name, cols in (("events", ("t0", "t1", "tb")), ("pebbles", ("t_store", "t_free")),
                           ("memory", ("t",))):
            df = out[name]
            sel = df["rank"] == r
            for c in cols:
                df[c] = df[c].astype("Int64")
                true = df.loc[sel, c].astype("Float64")
                # invert true = t + oa + k (t - ta)
                df.loc[sel, c] = ((true - oa + k * ta) / (1 + k)).round().astype("Int64")
        est += [{"rank": r, "phase": "start", "t_local": ta, "offset_ns": oa, "rtt_ns": 20_000},
                {"rank": r, "phase": "end", "t_local": tb, "offset_ns": ob, "rtt_ns": 30_000}]
    meta["clock"]["estimates"] = est
    out["meta"] = meta
    return out


def make_run(path, *, clocks: dict | None = None, status: str = "complete",
             stats_csv: bool = True, fmt: int = F.FORMAT, **kw) -> Path:
    """pipeline_frames(**kw) (+ skew(clocks)) written to `path` in format `fmt`; returns the
    path."""
    fr = pipeline_frames(**kw)
    if clocks:
        fr = skew(fr, clocks)
    fr["meta"]["status"] = status
    if status == "failed":
        fr["meta"]["error"] = {"rank": 1, "type": "RuntimeError", "message": "synthetic failure"}
    return write_run(path, fr["meta"], fr["events"], fr["pebbles"], fr["memory"], fr["stats"],
                     fr["schedule"], stats_csv=stats_csv, fmt=fmt)
