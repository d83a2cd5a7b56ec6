"""One pass over a run of any length: its chunks of steps analysed one at a time, in parallel.

`analyse(index, opts)` plans chunks of steps (analysis.read.scan), and for each chunk, in a worker
process (forked; `workers=1`: in this one), reads its frames and computes its share of
everything analysis.pebble writes:

- its metrics.Partial (steps.csv's rows, counts and maxima; the values the run's medians need
  go to a Spill on disk, one file per key and worker);
- the memory figure's curves over its own time range, already cut to the figure's columns
  (plots.memory.MemoryCurves);
- the planned timeline's inputs (each action's duration, each receive's transfer: into the
  Spill);
- the frames of the few steps the pebble graph and the timeline draw, and the trace events of
  the steps the trace holds (rendered to a file per window of steps);
- its slowest steady step (the run's slowest is one of them: `slowest_fragment` renders that
  one's trace events afterwards, from a chunk of that step alone).

The chunks' results are merged in step order (each is small: memory is that of a chunk per
worker, whatever the run's length). Steps are independent beyond their neighbours, which
each chunk reads as context, so the merged result is the one pass over the whole run would
give (tests/test_stream.py: two halves merged = whole, chunk boundaries inside steps'
windows).
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import chrome, metrics
from analysis.measure import critical
from analysis.measure.decimate import MemoryCurves
from analysis.measure.live import live_bytes
from analysis.measure.plan import action_totals
from analysis.measure.spill import Spill
from analysis.measure.waits import recv_split
from analysis.measure.windows import steady, step_windows
from analysis.read.scan import TARGET, RunIndex
from harness.ops import malloc

FLOW_IDS = 1 << 24        # flow ids of a trace window: its first step x this + 1, ...


@dataclass
class Options:
    """What the pass keeps besides the summary."""
    columns: int = 510                  # the memory figure's columns (plots.common.columns)
    pebble_step: int | None = None      # the pebble graph's step: its frames are kept
    timeline_steps: tuple = ()          # the timeline's steps: their events and path kept
    trace_steps: object = None          # steps whose trace events are rendered: a set, "all"
    slowest: bool = False               # find the slowest steady step (its span, its step)
    folder: Path | None = None          # where spill files and trace fragments go (None:
    #                                     memory; analyse() then runs in this process)
    target: int = TARGET                # rows per chunk
    workers: int = 1


@dataclass
class Fragment:
    """Trace events of a window of consecutive steps, rendered (chrome.fragment)."""
    steps: tuple
    path: Path | None
    data: bytes | None
    count: int
    lanes: list
    critical_ranks: set

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


@dataclass
class ChunkResult:
    part: metrics.Partial
    curves: MemoryCurves
    matched: bool                       # some steady receive matched its send
    kept: dict = field(default_factory=dict)   # what the figures draw (module docstring)
    fragments: list = field(default_factory=list)
    slowest: tuple | None = None        # (span, step) of its slowest steady step


class StepRows:
    """steps.csv's rows of a pass, kept chunk by chunk in a file (or, without a folder, in
    memory): what the run adds per step stays out of the process. `frames()` hands them back
    in order, typed as one table of them would be (the peak activation bytes integers only if
    every row has one)."""

    def __init__(self, folder: Path | None):
        self.path = None if folder is None else Path(folder) / "steps.pkl"
        self.mem, self.ranks, self.n, self.whole_ints = [], set(), 0, True

    def add(self, table: pd.DataFrame) -> None:
        if not len(table):
            return
        self.ranks |= set(int(r) for r in table["rank"].unique())
        self.n += len(table)
        self.whole_ints &= table["peak_act_bytes"].dtype.kind in "iu"
        if self.path is None:
            self.mem.append(table)
        else:
            with open(self.path, "ab") as f:
                pickle.dump(table, f, protocol=pickle.HIGHEST_PROTOCOL)

    def frames(self):
        parts = iter(self.mem) if self.path is None else self._read()
        for t in parts:
            if not self.whole_ints and t["peak_act_bytes"].dtype.kind in "iu":
                t = t.assign(peak_act_bytes=t["peak_act_bytes"].astype("float64"))
            yield t

    def _read(self):
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            while True:
                try:
                    yield pickle.load(f)
                except EOFError:
                    return

    def table(self) -> pd.DataFrame:
        """All rows in one frame (small runs, tests)."""
        got = list(self.frames())
        return pd.concat(got, ignore_index=True) if got else pd.DataFrame()


@dataclass
class Result:
    """The merged pass: summary (metrics.json without per_step), the step table (steps.csv),
    the memory curves, the planned timeline's inputs, the kept frames, the trace fragments."""
    summary: dict
    rows: StepRows                 # steps.csv's rows (and each step's window start, w0)
    curves: MemoryCurves
    durations: pd.Series
    latency: float
    kept: dict
    fragments: list
    slowest: tuple | None
    spill: Spill
    opts: Options


# -- one chunk ------------------------------------------------------------------------------

_STATE: dict = {}    # the index and options a forked worker inherits


def _work(ab) -> ChunkResult:
    idx, opts, lohi = _STATE["index"], _STATE["opts"], _STATE["lohi"]
    spill = _STATE.get("spill") or Spill(opts.folder, tag=str(os.getpid()))
    _STATE["spill"] = spill
    out = chunk_result(idx, ab[0], ab[1], opts, spill, lohi)
    malloc.trim()     # the chunk's frames are gone: their memory back to the kernel
    return out


def chunk_result(idx: RunIndex, a: int, b: int, opts: Options, spill: Spill, lohi) -> ChunkResult:
    """Everything chunk a..b adds (module docstring)."""
    c = idx.chunk(a, b)
    own = c.own
    stead = steady(idx.complete)[1]
    rt = critical.RankTimes(c.events)
    path = critical.critical_path(c.events, own, rt)
    lb = live_bytes(c.pebbles)
    part = metrics.partial(c.events, c.pebbles, c.memory, idx.meta, spill, own, stead, path, rt,
                           (c.t_lo, c.t_hi), lb)
    lb = lb[((lb["time"] >= c.t_lo) & (lb["time"] < c.t_hi)).to_numpy()]
    mem = c.memory[((c.memory["time"] >= c.t_lo) & (c.memory["time"] < c.t_hi)).to_numpy()]
    curves = MemoryCurves(lohi[0], lohi[1], opts.columns).add(lb, mem)
    # the planned timeline's medians: every steady action's duration, receive's transfer
    mine = sorted(set(own) & set(stead))
    ev = c.events[c.events["step"].isin(mine).to_numpy()]
    for (r, act), v in action_totals(ev).groupby(level=[0, 1]):
        spill.add(f"plan.{int(r)}.{act}", v.to_numpy())
    rs = recv_split(ev)
    spill.add("plan.latency", rs["transfer"].to_numpy())
    out = ChunkResult(part, curves, bool(rs["matched"].any()))
    _keep(out, c, own, path, opts)
    _trace(out, c, own, path, opts, part, stead)
    return out


def _keep(out: ChunkResult, c, own, path, opts: Options) -> None:
    """The frames of the figures' steps among `own`."""
    ev, peb = c.events, c.pebbles
    n = opts.pebble_step
    if n is not None and n in own:
        e = ev[(ev["step"] == n).to_numpy()]
        win = step_windows(e[(e["lane"] != "step").to_numpy()]).iloc[0]
        lo, hi = win["start"], win["end"]
        near = ((ev["step"] == n) | ((ev["end"] > lo) & (ev["start"] < hi))).to_numpy()
        held = ((peb["step"] == n) | ((peb["stored"] <= hi) & ~(peb["freed"] <= lo))).to_numpy()
        out.kept["pebble"] = (ev[near], peb[held])
    shown = [s for s in opts.timeline_steps if s in own]
    if shown:
        out.kept["timeline"] = (ev[ev["step"].isin(shown).to_numpy()],
                                path[path["step"].isin(shown)])


def _trace(out: ChunkResult, c, own, path, opts: Options, part, stead) -> None:
    """The trace fragments of the chunk's steps that the trace holds, a window of consecutive
    steps each, and (span, step) of its slowest steady step."""
    want = opts.trace_steps
    steps = own if want == "all" else [s for s in own if want and s in want]
    for win in _runs(steps):
        out.fragments.append(_fragment(c, win, path, opts, whole=want == "all"))
    if opts.slowest:
        t = part.table
        t = t[t["step"].isin(stead)]
        if len(t):
            spans = t.groupby("step")["span"].first()
            out.slowest = (float(spans.max()), int(spans.idxmax()))


def slowest_fragment(idx: RunIndex, step: int, opts: Options) -> Fragment:
    """The trace events of one step, read and walked on their own (the window's slowest step,
    found by the pass)."""
    c = idx.chunk(step, step)
    path = critical.critical_path(c.events, [step], critical.RankTimes(c.events))
    return _fragment(c, [step], path, opts)


def _runs(steps) -> list:
    """Consecutive steps grouped: [1, 2, 3, 7] -> [[1, 2, 3], [7]]."""
    out = []
    for s in sorted(steps):
        if out and s == out[-1][-1] + 1:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _fragment(c, steps: list, path, opts: Options, whole: bool = False) -> Fragment:
    """The trace events of `steps` (consecutive) of chunk c. whole: every step of the run is in
    the trace: the counters are those of the chunk's own time range, so that each appears
    once; else those of the steps' own time (first start to last end), the activation
    counter starting at the level held then."""
    ev = c.events[c.events["step"].isin(steps).to_numpy()]
    if whole:
        lo, hi = c.t_lo, c.t_hi
        peb = c.pebbles
    else:
        lo, hi = float(ev["start"].min()), float(ev["end"].max())
        peb = c.pebbles[((c.pebbles["stored"] <= hi) & ~(c.pebbles["freed"] < lo)).to_numpy()]
        hi = np.nextafter(hi, np.inf)   # the range is [lo, hi): the last end in it
    crit = path[path["step"].isin(steps)]
    parts = list(chrome.fragment(ev, peb, c.memory, crit, flow_base=steps[0] * FLOW_IDS,
                                 t_from=None if lo == -np.inf else lo,
                                 t_to=None if hi == np.inf else hi, start_level=not whole))
    data = b"".join(bytes(p) for p, _ in parts)
    n = sum(k for _, k in parts)
    lanes = chrome.lanes_of(ev) if len(ev) else []
    crit_ranks = set(int(r) for r in crit["rank"].unique())
    if opts.folder is not None:
        p = Path(opts.folder) / f"trace-{steps[0]:09d}-{steps[-1]:09d}.part"
        p.write_bytes(data)
        return Fragment(tuple(steps), p, None, n, lanes, crit_ranks)
    return Fragment(tuple(steps), None, data, n, lanes, crit_ranks)


# -- the pass -------------------------------------------------------------------------------

def analyse(idx: RunIndex, opts: Options, log=lambda msg: None, on_started=None) -> Result:
    """One pass over the run (module docstring). on_started(): called once the workers are
    running (this process then mostly waits for them)."""
    spill = Spill(opts.folder)
    plan = idx.plan(opts.target)
    lohi = _time_range(idx)
    _STATE.update(index=idx, opts=opts, lohi=lohi)
    _STATE.pop("spill", None)
    workers = max(1, min(opts.workers, len(plan)))
    if workers > 1 and opts.folder is not None and sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("fork")
        # one chunk per task: a worker sends each chunk's result when it is done (with several
        # per task it would hold them all and send them at once: memory growing with the run);
        # a chunk re-enters the files at its own batches
        with ctx.Pool(workers) as pool:
            results = pool.imap(_work, plan, chunksize=1)
            if on_started:
                on_started()
            res = merge(idx, opts, results, spill)
    else:
        _STATE["spill"] = spill
        res = merge(idx, opts, (chunk_result(idx, a, b, opts, spill, lohi) for a, b in plan),
                    spill)
    log(f"analysed {len(plan)} chunk(s) of steps in {workers} process(es)")
    return res


def _time_range(idx: RunIndex) -> tuple[float, float]:
    """The memory figure's time axis: first to last pebble store/free or memory sample
    (seconds since the origin), as plots.memory takes it from a whole run."""
    ends = [v for t in idx.times.values() for v in t.values()]
    if not ends:
        return 0.0, 1.0
    return ((min(v[0] for v in ends) - idx.origin) / 1e9,
            (max(v[1] for v in ends) - idx.origin) / 1e9)


def merge(idx: RunIndex, opts: Options, results, spill: Spill) -> Result:
    """The chunks' results, in step order, folded into one as they arrive (module docstring):
    what is kept of each chunk is its rows of steps.csv and a few counts."""
    parts, rows, curves, matched = [], StepRows(opts.folder), None, False
    kept, tl, frags, slowest = {}, [], [], None
    for r in results:
        rows.add(r.part.table)
        r.part.table = None
        parts.append(r.part)
        curves = r.curves if curves is None else curves.merge(r.curves)
        matched |= r.matched
        if "pebble" in r.kept:
            kept["pebble"] = r.kept["pebble"]
        if "timeline" in r.kept:
            tl.append(r.kept["timeline"])
        frags += r.fragments
        if r.slowest is not None and (slowest is None or r.slowest[0] > slowest[0]):
            slowest = r.slowest
    summary = metrics.summary_of(parts, idx.meta, idx.complete, spill, sorted(rows.ranks))
    if curves is None:
        curves = MemoryCurves(*_time_range(idx), opts.columns)
    keys = [k for k in spill.keys() if k.startswith("plan.") and k != "plan.latency"]
    dur = pd.Series({(int(k.split(".")[1]), k.split(".", 2)[2]): spill.median(k)
                     for k in keys}, dtype=float)
    if len(dur):
        dur = dur.sort_index()
    latency = float(spill.median("plan.latency")) if matched else 0.0
    if tl:
        ev = pd.concat([e for e, _ in tl])
        order = np.lexsort((ev["start"].to_numpy(), ev["rank"].to_numpy()))
        kept["timeline"] = (ev.iloc[order], pd.concat([p for _, p in tl], ignore_index=True))
    return Result(summary, rows, curves, dur, latency, kept, frags, slowest, spill, opts)
