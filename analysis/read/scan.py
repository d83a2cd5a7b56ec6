"""A run read in chunks of steps, in memory bounded by the chunk, not by the run.

`open_run(path)` reads meta.json and stats.csv and makes one pass over every trace file (the
index): per batch of rows the steps (or, for memory samples, the times) it holds and where it
ends in the file; per step the events it has and when they start and end (aligned to rank 0's
clock); which steps every rank completed; the run's origin (its first event); and the pebbles
that outlive the step after theirs (never freed, or held across steps, as with
pipeline.detach=false), which are kept aside. Then `RunIndex.chunk(a, b)` hands out the frames
of steps a..b (the columns and order of `analysis.read.load.Run`'s) with the context every analysis
of those steps needs:

- the neighbouring steps: a step's window can hold another step's work (a receive posted in
  step k-1 for step k; ranks a step apart), and the critical path, the blame and the pebble
  graph look at every span in a window. A chunk takes steps a-1 and b+1 and widens that until
  no event of a step outside it overlaps the chunk's own steps in time (checked on the index:
  per step, its first start and last end over all ranks);
- the pebbles still held when step a begins (from the kept-aside ones), so the activation bytes
  held, a running sum over the whole run, come out the same in every chunk;
- the memory samples of its time range.

The chunk's own time range is [cut(a), cut(b+1)), cut(k) the first event start of step k (or
later): every store, free and sample falls in exactly one chunk's range, so a quantity summed or
drawn over time adds up across chunks. `chunks(target)` plans chunks of about `target` rows.

Format 1 (CSV) files are parsed whole into memory first (runs written before format 2 stay
readable, not bounded); format 2 (Arrow) files are read batch by batch, each chunk's batches
only, so memory is that of a chunk.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pacompute

from analysis.read import align as A, runmeta
from analysis.read.tracefile import ARROW, DTYPES, TraceFile, nullable
from harness.ops import malloc
from harness.runformat import LANE, TRACE_COLS, trace_file

KINDS = ("events", "pebbles", "memory")
BLOCK = 1 << 16       # rows of batches taken together in the index pass
TARGET = 400_000      # rows (events + pebbles) per chunk, by default
# trace bytes from which the index pass forks (open_run's workers): below it a forked pool
# costs more than it saves (2 cores, two 1F1B ranks: 14 vs 52 ms at 0.03 MiB, 135 vs 142 ms at
# 15 MiB, 258 vs 275 ms at 29 MiB, 536 vs 401 ms at 59 MiB)
PARALLEL_BYTES = 32 << 20
_NONE = np.iinfo(np.int64).max   # a batch with no row to hand out: its key range is empty
_TIMES = ("t0", "t1", "tb", "t_store", "t_free", "t")

# the frames' columns (analysis.read.load's docstring)
EVENT_FRAME = ("rank", "step", "mb", "layer", "kind", "lane", "start", "end", "tb", "peer", "tag",
               "bytes", "pair")
PEBBLE_FRAME = ("rank", "step", "mb", "layer", "kind", "bytes", "stored", "freed", "module",
                "shape", "dtype")
MEMORY_FRAME = ("rank", "time", "source", "bytes")


@dataclass
class FileIndex:
    """One trace file's batches: rows, the key range of the rows it hands out (steps; aligned
    ns for memory samples), and (format 2) the byte where each ends."""
    tf: TraceFile
    rank: int
    kind: str
    rows: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    pos: np.ndarray

    def batches(self, want: np.ndarray, cache: dict) -> list:
        """[(position, batch)] at positions `want` (sorted): from `cache` where there, else
        read from the file, runs of consecutive ones at once, continuing a sequential read
        where one is open."""
        out = []
        want = want.tolist()
        i = 0
        while i < len(want):
            k = want[i]
            if k in cache:
                out.append((k, cache[k]))
                i += 1
                continue
            j = i                       # a run of consecutive positions not cached
            while j + 1 < len(want) and want[j + 1] == want[j] + 1 and want[j + 1] not in cache:
                j += 1
            it = cache.get("iter")
            if it is None or cache.get("next") != k:
                it = cache["iter"] = self.tf.batches(k, self.pos)
            got = list(itertools.islice(it, j - i + 1))
            cache["next"] = k + len(got)
            out += zip(range(k, k + len(got)), got)
            if len(got) < j - i + 1:    # the file ended early (a torn last batch)
                break
            i = j + 1
        return out


@dataclass
class Chunk:
    """Frames of steps lo..hi (inclusive) with their context steps lo_ctx..hi_ctx, and the
    chunk's own time range [t_lo, t_hi) in seconds since the run's origin (-inf/inf at the run's
    ends). Frames as analysis.read.load.Run's."""
    lo: int
    hi: int
    lo_ctx: int
    hi_ctx: int
    t_lo: float
    t_hi: float
    events: pd.DataFrame
    pebbles: pd.DataFrame
    memory: pd.DataFrame

    @property
    def own(self) -> list:
        """The chunk's own steps that have events."""
        s = self.events["step"].to_numpy()
        return sorted(int(x) for x in np.unique(s[(s >= self.lo) & (s <= self.hi)]))


@dataclass
class RunIndex:
    """What the index pass learned of a run (module docstring); `chunk` reads a part of it."""
    path: Path
    meta: dict
    warnings: list
    world: int
    ranks: list
    files: dict                     # (kind, rank) -> FileIndex
    steps: np.ndarray               # every step with an event or a pebble, sorted
    rows: np.ndarray                # per step: event and pebble rows over all ranks
    ev_rows: np.ndarray             # per step: event rows over all ranks
    t0: np.ndarray                  # per step: first event start, aligned ns (+big: none)
    t1: np.ndarray                  # per step: last event end, aligned ns (-big: none)
    cut: np.ndarray                 # per step: the suffix minimum of t0 (non-decreasing)
    origin: int
    complete: list
    stats_rows: int                 # rows of stats.csv (the frame itself: `stats`)
    schedule: dict | None
    ev_steps: np.ndarray            # the steps with events, sorted
    ev_cut: np.ndarray              # per step of ev_steps: the suffix minimum of its t0
    kept: dict = field(default_factory=dict)     # rank -> pebble rows kept aside (pa.Table)
    kept_pos: dict = field(default_factory=dict)  # rank -> their (batch, row) in the file
    times: dict = field(default_factory=dict)   # "pebbles"/"memory" -> rank -> (min, max) ns
    _cache: dict = field(default_factory=dict)

    @property
    def stats(self) -> pd.DataFrame:
        """stats.csv (or the ranks' stats.r<R>.csv), read now: one row per step and rank, so
        the index does not hold it (its warnings were said when the index was made)."""
        return runmeta.read_stats(self.path, [])

    # -- planning ---------------------------------------------------------------------------
    def plan(self, target: int = TARGET) -> list[tuple[int, int]]:
        """Consecutive step ranges (first, last) of about `target` rows each (a step is never
        split); all of them cover every step."""
        out, start, acc = [], 0, 0
        for i, n in enumerate(self.rows.tolist()):
            if acc and acc + n > target:
                out.append((int(self.steps[start]), int(self.steps[i - 1])))
                start, acc = i, 0
            acc += n
        if len(self.steps):
            out.append((int(self.steps[start]), int(self.steps[-1])))
        return out

    def context(self, a: int, b: int) -> tuple[int, int]:
        """Positions (in `steps`) of the first and last step a chunk of steps a..b loads: one
        step either side, widened until every event of a step outside lies wholly before
        (after) every event of the chunk's own steps."""
        i, j = np.searchsorted(self.steps, [a, b])
        own_lo = self.t0[i:j + 1].min()
        own_hi = self.t1[i:j + 1].max()
        lo = max(i - 1, 0)
        while lo > 0 and self.t0[lo] == _NONE:       # at least one step with events before
            lo -= 1
        before = np.maximum.accumulate(self.t1)       # last end of any step up to each
        while lo > 0 and before[lo - 1] >= own_lo:
            lo -= 1
        hi = min(j + 1, len(self.steps) - 1)
        after = np.minimum.accumulate(self.t0[::-1])[::-1]   # first start of any step from each
        while hi < len(self.steps) - 1 and after[hi + 1] <= own_hi:
            hi += 1
        return lo, hi

    # -- reading ----------------------------------------------------------------------------
    def chunk(self, a: int, b: int) -> Chunk:
        """The frames of steps a..b and their context (module docstring)."""
        i, j = (int(x) for x in np.searchsorted(self.steps, [a, b]))
        lo, hi = self.context(a, b)
        s_lo, s_hi = int(self.steps[lo]), int(self.steps[hi])
        n = len(self.steps)
        cut_lo = -_NONE if i == 0 else int(self.cut[i])
        cut_hi = _NONE if j + 1 >= n else int(self.cut[j + 1])
        m_lo = -_NONE if lo == 0 else int(self.cut[lo])
        m_hi = _NONE if hi + 1 >= n else int(self.cut[hi + 1])
        parts = {k: {} for k in KINDS}
        for (kind, r), fi in self.files.items():
            if kind == "memory":
                t = self._read(fi, m_lo, m_hi, "t")
            else:
                t = self._read(fi, s_lo, s_hi, "step")
            if kind == "pebbles":
                t = self._with_kept(r, t, s_lo, s_hi, cut_lo)
            elif t is not None:
                t = t[0]
            if t is not None:
                parts[kind][r] = t
        # keep only the batches the next chunk's context (from step b on) may read again
        for fi in self.files.values():
            c = self._cache.get((fi.kind, fi.rank))
            if c:
                key = (-_NONE if j == 0 else int(self.cut[j])) if fi.kind == "memory" else b
                for k in [k for k in c if isinstance(k, int) and fi.hi[k] < key]:
                    del c[k]
        ev, peb, mem = build_frames(parts, self.meta, self.origin)
        sec = lambda x: -np.inf if x == -_NONE else np.inf if x == _NONE else \
            (x - self.origin) / 1e9   # noqa: E731
        return Chunk(a, b, s_lo, s_hi, sec(cut_lo), sec(cut_hi), ev, peb, mem)

    def _read(self, fi: FileIndex, lo: int, hi: int, col: str):
        """The rows of file `fi` whose key (step, or aligned time) is in [lo, hi] (time: [lo,
        hi)), as one table with their (batch, row) positions, or None if it has none."""
        want = np.flatnonzero((fi.lo <= hi) & (fi.hi >= lo) & (fi.rows > 0))
        if not len(want):
            return None
        cache = self._cache.setdefault((fi.kind, fi.rank), {})
        pairs = fi.batches(want, cache)
        if not pairs:
            return None
        which, got = zip(*pairs)
        # the last batches may be the next chunk's context: kept (chunk() trims the cache)
        for k, b in pairs[-8:]:
            cache[k] = b
        # one chunk per column: the columns' work below is per array, not per batch (a step's
        # batch is a few hundred rows); a format 2 file's dictionaries only grow, so they unify
        # at little cost
        t = pa.Table.from_batches(got).combine_chunks()
        rows = np.array([b.num_rows for b in got], np.int64)
        key = t.column(col).to_numpy()
        if col == "t":
            key = A.align(self.meta, fi.rank, key)
            keep = (key >= lo) & (key < hi)
        else:
            keep = (key >= lo) & (key <= hi)
        if fi.kind == "pebbles":
            keep &= ~self._long(fi.rank, t)
        pos = np.c_[np.repeat(np.array(which, np.int64), rows),
                    np.arange(len(key)) - np.repeat(np.cumsum(rows) - rows, rows)]
        if not keep.any():
            return None
        if not keep.all():
            t = t.filter(pa.array(keep))
            pos = pos[keep]
        return t, pos

    def _long(self, rank: int, batch) -> np.ndarray:
        """Which pebble rows of `batch` (a batch or table) outlive the step after theirs (kept
        aside): never freed, or freed at or after the first event of the second step after
        theirs."""
        step = batch.column("step").to_numpy().astype(np.int64)
        free = batch.column("t_free")
        gone = free.is_null().to_numpy(zero_copy_only=False)
        t = A.align(self.meta, rank, free.fill_null(0).to_numpy())
        return gone | (t >= self._cut_after(step))

    def _cut_after(self, step: np.ndarray) -> np.ndarray:
        """cut of the second step after each of `step` (the chunk boundary from which a pebble
        of that step is no longer in a chunk's context); +big where there is none."""
        k = np.searchsorted(self.ev_steps, step, "right") + 1
        ext = np.r_[self.ev_cut, _NONE]
        return ext[np.minimum(k, len(self.ev_cut))]

    def _with_kept(self, rank, got, s_lo, s_hi, cut_lo):
        """A rank's pebble rows of steps s_lo..s_hi plus its kept-aside rows of those steps or
        still held at cut_lo, in file order."""
        kept = self.kept.get(rank)
        if kept is not None and kept.num_rows:
            step = kept.column("step").to_numpy().astype(np.int64)
            free = kept.column("t_free")
            held = free.is_null().to_numpy(zero_copy_only=False) | (
                A.align(self.meta, rank, free.fill_null(0).to_numpy()) >= cut_lo)
            use = np.flatnonzero((step <= s_hi) & ((step >= s_lo) | held))
            if len(use):
                extra = kept.take(pa.array(use)), self.kept_pos[rank][use]
                got = extra if got is None else (
                    pa.concat_tables([got[0], extra[0]], promote_options="permissive"),
                    np.concatenate([got[1], extra[1]]))
        if got is None:
            return None
        t, pos = got
        order = np.lexsort((pos[:, 1], pos[:, 0]))
        if np.any(np.diff(order) != 1):
            t = t.take(pa.array(order))
        return t


# -- the index pass -----------------------------------------------------------------------------

def open_run(path, workers: int = 1) -> RunIndex:
    """Read a run directory's meta, stats and the index of every trace file (module docstring).
    Raises RunFormatError (naming the file) when it is not a run or a file's format is
    unknown. workers: processes that index the files side by side (forked; format 2 files of
    PARALLEL_BYTES in all or more)."""
    d = Path(path)
    meta, warnings = runmeta.read_meta(d)
    world = int(meta.get("world_size") or 0)
    ranks = list(range(world)) if world else sorted(
        {int(m.group(2)) for p in (d / "trace").glob("*.r*.*")
         if (m := _RANKED.match(p.name))})
    files, have = {}, {}
    fmt = int(meta.get("format") or 1)   # the trace files' format is the run's
    for r in ranks:
        for kind in KINDS:
            p = d / trace_file(kind, r, fmt)
            tf = TraceFile(p, kind, warnings) if p.exists() else None
            if tf is None or tf.fmt is None:
                if tf is None:
                    warnings.append(f"rank {r}: {p.relative_to(d)} missing")
                continue
            files[kind, r] = tf
            if kind == "events":
                have[r] = True
    warnings += runmeta.local_dir_notes(meta, have)
    idx_files, per = {}, []        # per: rank, step, rows, t0, t1 (aligned), done
    # format 1 tables would travel back by pipe; a small run is indexed faster here
    par = workers if fmt == 2 and sum(tf.path.stat().st_size for tf in files.values()) >= \
        PARALLEL_BYTES else 1
    jobs = [(k, (_scan_events, (tf, k[1], meta))) for k, tf in files.items() if k[0] == "events"]
    for (kind, r), (fi, agg, said) in _map(jobs, par):
        idx_files[kind, r] = fi
        per.append(agg.assign(rank=r))
        warnings += said
    cols = ["rank", "step", "rows", "t0", "t1", "done"]
    agg = pd.concat(per, ignore_index=True) if per else pd.DataFrame(
        {c: np.zeros(0, np.int64) for c in cols})
    g = agg.groupby("step").agg(rows=("rows", "sum"), t0=("t0", "min"), t1=("t1", "max"))
    ev_steps = g.index.to_numpy(np.int64)
    ev_cut = np.minimum.accumulate(g["t0"].to_numpy(np.int64)[::-1])[::-1] \
        if len(g) else np.zeros(0, np.int64)
    # steps every rank finished: their `step` spans (or any event, where no rank writes them)
    use_done = bool(agg["done"].any()) if len(agg) else False
    fin = agg[agg["done"] > 0] if use_done else agg
    finished = {int(r): set(v.astype(int).tolist())
                for r, v in fin.groupby("rank")["step"].unique().items()}
    complete = runmeta.complete_steps(finished, ranks, sorted(int(s) for s in ev_steps), warnings)
    origin = int(g["t0"].min()) if len(g) else None
    kept, kept_pos, times, prow = {}, {}, {"pebbles": {}, "memory": {}}, []
    jobs = [(k, (_scan_pebbles, (tf, k[1], meta, ev_steps, ev_cut)) if k[0] == "pebbles" else
             (_scan_memory, (tf, k[1], meta))) for k, tf in files.items() if k[0] != "events"]
    for (kind, r), got in _map(jobs, par):
        if kind == "pebbles":
            fi, k, kp, steps, rows, tmin, tmax, said = got
            kept[r], kept_pos[r] = k, kp
            prow.append(pd.DataFrame({"step": steps, "rows": rows}))
        else:
            fi, tmin, tmax, said = got
        if tmin is not None:
            times[kind][r] = (tmin, tmax)
        warnings += said
        idx_files[kind, r] = fi
    if origin is None:   # no events: the earliest pebble or sample
        starts = [v[0] for t in times.values() for v in t.values()]
        origin = min(starts) if starts else 0
    pr = pd.concat(prow, ignore_index=True).groupby("step")["rows"].sum() if prow else \
        pd.Series(dtype=np.int64)
    steps = np.union1d(ev_steps, pr.index.to_numpy(np.int64)).astype(np.int64)
    rows = (g["rows"].reindex(steps, fill_value=0).to_numpy(np.int64)
            + pr.reindex(steps, fill_value=0).to_numpy(np.int64))
    at = np.searchsorted(steps, ev_steps)       # the steps with events among all
    t0, t1 = np.full(len(steps), _NONE), np.full(len(steps), -_NONE)
    t0[at], t1[at] = g["t0"].to_numpy(np.int64), g["t1"].to_numpy(np.int64)
    cut = np.minimum.accumulate(t0[::-1])[::-1] if len(steps) else np.zeros(0, np.int64)
    schedule = None
    if (d / "schedule.json").exists():
        try:
            schedule = json.loads((d / "schedule.json").read_text())
        except json.JSONDecodeError:
            warnings.append(f"{d / 'schedule.json'}: not valid JSON, planned schedule skipped")
    malloc.trim()    # the index pass's batches are gone: their memory back to the kernel
    stats = runmeta.read_stats(d, warnings)
    warnings += runmeta.divergence(stats, meta)
    stats, n_stats = None, len(stats)     # read again when asked for (RunIndex.stats)
    ev_rows = g["rows"].reindex(steps, fill_value=0).to_numpy(np.int64)
    return RunIndex(d, meta, warnings, world or len(ranks), ranks, idx_files, steps, rows,
                    ev_rows, t0,
                    t1, cut, int(origin), complete, n_stats, schedule, ev_steps, ev_cut, kept,
                    kept_pos, times)


def _map(jobs: list, workers: int) -> list:
    """[(key, (fn, args))] -> [(key, fn(*args))], in forked processes side by side where
    there are several jobs and workers (each job's TraceFile travels back with its result)."""
    if workers <= 1 or len(jobs) < 2 or not sys.platform.startswith("linux"):
        return [(k, fn(*args)) for k, (fn, args) in jobs]
    with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        return list(zip([k for k, _ in jobs], pool.map(_call, [f for _, f in jobs])))


def _call(job):
    fn, args = job
    return fn(*args)


_RANKED = __import__("re").compile(r"^(events|pebbles|memory)\.r(\d+)\.(csv|arrows)$")


def _blocks(tf: TraceFile):
    """The file's batches in groups of about BLOCK rows: (table of the group, each batch's
    rows, each batch's end byte)."""
    group, rows, pos, n = [], [], [], 0
    for b, p in tf.scan():
        group.append(b)
        rows.append(b.num_rows)
        pos.append(-1 if p is None else p)
        n += b.num_rows
        if n >= BLOCK:
            yield pa.Table.from_batches(group), rows, pos
            group, rows, pos, n = [], [], [], 0
    if group:
        yield pa.Table.from_batches(group), rows, pos


def _per_batch(key: np.ndarray, rows: list, mask: np.ndarray | None = None):
    """Per batch of a block, the min and max of `key` over its rows (where `mask`)."""
    at = np.r_[0, np.cumsum(rows)[:-1]].astype(np.int64)
    if mask is not None:
        key_lo = np.where(mask, key, _NONE)
        key_hi = np.where(mask, key, -_NONE)
    else:
        key_lo = key_hi = key
    ne = np.asarray(rows) > 0
    lo, hi = np.full(len(rows), _NONE), np.full(len(rows), -_NONE)
    if ne.any():
        lo[ne] = np.minimum.reduceat(key_lo, at[ne])
        hi[ne] = np.maximum.reduceat(key_hi, at[ne])
    return lo, hi


def _runs(step: np.ndarray, *cols):
    """Rows grouped by runs of equal step -> (step of each run, rows, reduced cols), each col
    given as (values, ufunc)."""
    if not len(step):
        return (np.zeros(0, np.int64), np.zeros(0, np.int64)) + tuple(
            np.zeros(0, v.dtype) for v, _ in cols)
    at = np.flatnonzero(np.r_[True, step[1:] != step[:-1]])
    n = np.diff(np.r_[at, len(step)])
    return (step[at], n) + tuple(f.reduceat(v, at) for v, f in cols)


def _index(tf, rank, kind, rows, lo, hi, pos) -> FileIndex:
    cat = lambda x, dt: np.concatenate(x).astype(dt) if x else np.zeros(0, dt)  # noqa: E731
    return FileIndex(tf, rank, kind, cat(rows, np.int64), cat(lo, np.int64), cat(hi, np.int64),
                     cat(pos, np.int64))


def _scan_events(tf: TraceFile, rank: int, meta: dict):
    said = tf.warnings = []          # this file's warnings, returned (it may be in a fork)
    rows, lo, hi, pos, agg = [], [], [], [], []
    for t, n, p in _blocks(tf):
        step = t.column("step").to_numpy().astype(np.int64)
        t0, t1 = t.column("t0").to_numpy(), t.column("t1").to_numpy()
        done = pacompute.equal(t.column("kind"), pa.scalar("step")).to_numpy(
            zero_copy_only=False).astype(np.int64)
        a, b = _per_batch(step, n)
        rows.append(n), lo.append(a), hi.append(b), pos.append(p)
        s, k, m0, m1, dn = _runs(step, (t0, np.minimum), (t1, np.maximum), (done, np.add))
        agg.append(pd.DataFrame({"step": s, "rows": k, "t0": m0, "t1": m1, "done": dn}))
    fi = _index(tf, rank, "events", rows, lo, hi, pos)
    df = pd.concat(agg, ignore_index=True) if agg else pd.DataFrame(
        {c: np.zeros(0, np.int64) for c in ("step", "rows", "t0", "t1", "done")})
    df = df.groupby("step", as_index=False).agg(rows=("rows", "sum"), t0=("t0", "min"),
                                                t1=("t1", "max"), done=("done", "sum"))
    # aligned: the offset is non-decreasing in time, so the aligned minimum is the minimum's
    df["t0"], df["t1"] = A.align(meta, rank, df["t0"]), A.align(meta, rank, df["t1"])
    return fi, df, said


def _scan_pebbles(tf: TraceFile, rank: int, meta: dict, ev_steps, ev_cut):
    said = tf.warnings = []
    rows, lo, hi, pos, kept, kpos, st, cnt = [], [], [], [], [], [], [], []
    tmin, tmax, first = None, None, 0
    cut = np.r_[ev_cut, _NONE]
    for t, n, p in _blocks(tf):
        step = t.column("step").to_numpy().astype(np.int64)
        store = A.align(meta, rank, t.column("t_store").to_numpy())
        free = t.column("t_free")
        gone = free.is_null().to_numpy(zero_copy_only=False)
        tf_ = A.align(meta, rank, free.fill_null(0).to_numpy())
        after = cut[np.minimum(np.searchsorted(ev_steps, step, "right") + 1, len(ev_cut))]
        long = gone | (tf_ >= after)
        a, b = _per_batch(step, n, ~long)
        rows.append(n), lo.append(a), hi.append(b), pos.append(p)
        if long.any():
            idx = np.flatnonzero(long)
            kept.append(t.take(pa.array(idx)))
            bi = np.repeat(np.arange(len(n)), n)[idx] + first
            at = np.r_[0, np.cumsum(n)[:-1]]
            kpos.append(np.c_[bi, idx - np.repeat(at, n)[idx]])
        s, k = _runs(step)
        st.append(s), cnt.append(k)
        if len(step):
            hi_t = np.where(gone, store, np.maximum(store, tf_))
            tmin = store.min() if tmin is None else min(tmin, store.min())
            tmax = hi_t.max() if tmax is None else max(tmax, hi_t.max())
        first += len(n)
    fi = _index(tf, rank, "pebbles", rows, lo, hi, pos)
    k = pa.concat_tables(kept, promote_options="permissive") if kept else None
    kp = np.concatenate(kpos) if kpos else np.zeros((0, 2), np.int64)
    steps = np.concatenate(st) if st else np.zeros(0, np.int64)
    counts = np.concatenate(cnt) if cnt else np.zeros(0, np.int64)
    return fi, k, kp, steps, counts, tmin, tmax, said


def _scan_memory(tf: TraceFile, rank: int, meta: dict):
    said = tf.warnings = []
    rows, lo, hi, pos = [], [], [], []
    tmin, tmax = None, None
    for t, n, p in _blocks(tf):
        tt = A.align(meta, rank, t.column("t").to_numpy())
        a, b = _per_batch(tt, n)
        rows.append(n), lo.append(a), hi.append(b), pos.append(p)
        if len(tt):
            tmin = tt.min() if tmin is None else min(tmin, tt.min())
            tmax = tt.max() if tmax is None else max(tmax, tt.max())
    return _index(tf, rank, "memory", rows, lo, hi, pos), tmin, tmax, said


# -- frames -------------------------------------------------------------------------------------

def build_frames(parts: dict, meta: dict, origin: int):
    """Per kind {rank: pyarrow table} -> the events, pebbles and memory frames of a Run
    (analysis.read.load's docstring): times aligned, in seconds since `origin`, rows sorted by
    (rank, start) / (rank, stored) / (rank, source, time), text as categoricals."""
    ev = _cat(parts["events"], "events", meta)
    peb = _cat(parts["pebbles"], "pebbles", meta)
    mem = _cat(parts["memory"], "memory", meta)
    kind = ev["kind"]
    lanes = [LANE.get(k, "other") for k in kind.categories]
    ev["lane"] = pd.Categorical.from_codes(
        np.asarray(pd.Categorical(lanes, categories=sorted(set(lanes))).codes)[kind.codes]
        if len(lanes) else np.zeros(len(kind), int), categories=sorted(set(lanes)) or ["other"])
    del kind
    for c, name in (("t0", "start"), ("t1", "end"), ("tb", "tb")):
        ev[name] = A.secs(ev.pop(c), origin)
    # rows sorted by (rank, start), stable: one argsort, and each column taken once
    events = _frame(ev, _sorted_by(ev["start"], ev["rank"]), EVENT_FRAME)
    peb["stored"], peb["freed"] = (A.secs(peb.pop(c), origin) for c in ("t_store", "t_free"))
    # labels repeated per layer and microbatch: as Python strings ~110 MB per million pebbles,
    # as categoricals a byte or two a row; empty labels read as ""
    for c in ("module", "shape", "dtype"):
        peb[c] = _filled(peb[c], "")
    pebbles = _frame(peb, _sorted_by(peb["stored"], peb["rank"]), PEBBLE_FRAME)
    mem["time"] = A.secs(mem.pop("t"), origin)
    # sorted by (rank, source, time); sorted categories order as their text, NA last
    source = mem["source"]
    key = np.where(source.codes < 0, len(source.categories), source.codes)
    memory = _frame(mem, _sorted_by(mem["time"], key, mem["rank"]), MEMORY_FRAME)
    return events, pebbles, memory


def _sorted_by(*keys) -> np.ndarray | None:
    """np.lexsort(keys) (the last key first), or None when the rows are in that order already
    (a rank's events and memory samples are written in time order: no sort then; a stable
    sort of sorted rows leaves them as they are)."""
    a = [np.asarray(k) for k in keys[::-1]]
    n = len(a[0]) if a else 0
    if n < 2:
        return None
    same = np.ones(n - 1, bool)     # rows equal on the keys compared so far
    ok = True
    for k in a:
        d = k[1:] >= k[:-1]
        if not np.all(d | ~same):
            ok = False
            break
        same &= k[1:] == k[:-1]
    return None if ok else np.lexsort(keys)


def _filled(col: pd.Categorical, fill: str) -> pd.Categorical:
    """`col` (sorted categories) with NA as `fill`, its categories still sorted."""
    if not col.isna().any():
        return col
    if fill not in col.categories:
        col = col.add_categories([fill])
    col = col.fillna(fill)
    return col.reorder_categories(sorted(col.categories))


def _cat(parts: dict, kind: str, meta: dict) -> dict:
    """Per-rank tables {rank: table} of one trace kind -> {column: array over all ranks}, with
    the rank first. Times are aligned to rank 0's clock per rank (each rank has its own line),
    still int ns (int64, or IntegerArray where the column may be empty); integers int64; text
    columns categoricals with sorted categories, one set for all ranks."""
    ranks = sorted(parts)
    tables = [parts.pop(r) for r in ranks]
    out = {"rank": np.repeat(np.array(ranks, dtype=np.int64), [len(t) for t in tables])}
    for c, t in DTYPES[kind].items():
        cols = [tab.column(c) for tab in tables]
        tables = [tab.drop_columns([c]) for tab in tables]   # the column goes with `cols`
        if t is str:
            out[c] = _text(cols)
            continue
        if t == "Int64":
            cols, na = zip(*map(nullable, cols)) if cols else ((), ())
        else:
            cols = [x.to_numpy().astype(np.int64, copy=False) for x in cols]
        if c in _TIMES:
            cols = [A.align(meta, r, x) for r, x in zip(ranks, cols)]
        v = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        out[c] = pd.arrays.IntegerArray(v, np.concatenate(na) if na else np.zeros(0, bool)) \
            if t == "Int64" else v
    return out


def _text(cols: list) -> pd.Categorical:
    """Text columns (pyarrow; dictionary-encoded or plain) -> one pandas categorical over all
    of them, its categories sorted (byte order of UTF-8 = Python's order of str), empty cells
    NA.

    The frames' id-like text (kind, lane, pair, labels, sources) is categorical: a few kinds and
    one pair id per message repeat over millions of rows, and comparing, joining and sorting
    integer codes is ~10x faster than Python strings. Sorted categories group and sort as the
    strings would. A categorical takes no new value (map/replace to a value not among its
    categories fail): code that rewrites kinds does it on `.astype(object)`. Encoded and sorted
    in pyarrow: ~5x faster than pandas on string categories. A format 2 file's dictionary only
    grows (deltas), so its batches' codes already agree: its last dictionary serves them all."""
    words, codes = [], []
    for x in cols:
        chunks = [c for c in x.chunks if len(c)]
        if not chunks:
            continue
        if not pa.types.is_dictionary(x.type):       # plain text: encoded once
            enc = pa.concat_arrays(chunks).dictionary_encode()
            words.append(enc.dictionary)
            codes.append(enc.indices)
            continue
        longest = max((c.dictionary for c in chunks), key=len)
        one = {len(c.dictionary): c.dictionary for c in chunks}   # one per size suffices
        if all(d.equals(longest.slice(0, n)) for n, d in one.items()):
            words.append(longest)
            codes.append(pa.concat_arrays([c.indices for c in chunks]))
            continue
        u = pa.chunked_array(chunks).unify_dictionaries()    # CSV blocks: each its own
        words.append(u.chunk(0).dictionary)
        codes.append(pa.concat_arrays([c.indices for c in u.chunks]))
    if not words:
        return pd.Categorical([])
    # one set of words over the columns: each column's codes mapped into their union, sorted
    allw = pa.concat_arrays([w.cast(pa.string()) for w in words]).unique()
    order = pacompute.array_sort_indices(allw).to_numpy()
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    out = []
    for w, c in zip(words, codes):
        to = rank[pacompute.index_in(w, allw).to_numpy(zero_copy_only=False).astype(np.int64)]
        to = np.r_[to, -1].astype(np.int32)           # last slot: null -> -1
        ci = c.fill_null(-1).to_numpy(zero_copy_only=False) if c.null_count else \
            c.to_numpy(zero_copy_only=False)
        out.append(to[ci.astype(np.int64)])
    return pd.Categorical.from_codes(np.concatenate(out), dtype=pd.CategoricalDtype(
        pd.Index(allw.take(pa.array(order)).to_pandas())))


def _frame(cols: dict, order, names: tuple) -> pd.DataFrame:
    """A frame of the arrays `names` popped from `cols`, its rows in `order`: each column taken
    once and then released, and the frame built without copying them again into one block per
    dtype."""
    out = {}
    for c in names:
        v = cols.pop(c)
        if order is not None:
            v = v[order] if isinstance(v, np.ndarray) else v.take(order)
        out[c] = v
        del v
    return pd.DataFrame(out, copy=False)


__all__ = ["open_run", "RunIndex", "Chunk", "build_frames", "ARROW", "TRACE_COLS"]
