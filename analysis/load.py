"""Read a run directory (docs/run-format.md, format 1) into tidy pandas frames.

All times in the returned frames are float **seconds since the run's start**, on rank 0's clock:
each rank's local nanoseconds get that rank's clock offset (meta.clock.estimates, linear
interpolation between the "start" and "end" estimates, Score-P's method), then the earliest
aligned event start becomes 0. Frames (one row one thing, long form):

- events:  rank, step, mb, layer, kind, lane, start, end, tb, peer, tag, bytes, pair
           (tb: aligned time the rank began to block on a send/recv, NaN for other kinds;
            lane: compute | send | recv | copy | step; pair: NA when empty)
- pebbles: rank, step, mb, layer, kind, bytes, stored, freed   (freed NaN = never freed)
- memory:  rank, time, source, bytes
- stats:   step, rank, loss, grad_norm, update_norm, step_time  (step_time in seconds)

The loader reads partial runs (a crashed or running job): it loads what is there, drops a
truncated last line, and explains every gap in `Run.warnings`. It raises RunFormatError, naming
the file, only when the directory is not a run or a file is in a format it does not know.
Damaged rows (a stray quote, too many or too few fields, a value that is not a number) are
dropped and counted in a warning that names the file and their line numbers. A run whose
meta.json says "running" but whose processes are gone (harness.heartbeat) is reported as
status "died".
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.runformat import FORMAT, LANE, STATS_COLS, TRACE_COLS, parse_header, trace_file
from harness.trace.clock import interpolate_offset

_INT = "int64"
# dtypes of the columns as written (runformat.TRACE_COLS); t columns stay integer nanoseconds
# until aligned (float64 loses ns past 2^53); every column not named here is an integer
_TEXT, _NULLABLE = {"kind", "pair", "source", "module", "shape", "dtype"}, {"tb", "t_free"}
_DTYPES = {kind: {c: str if c in _TEXT else "Int64" if c in _NULLABLE else _INT for c in cols}
           for kind, cols in TRACE_COLS.items()}
_DTYPES["stats"] = {c: _INT if c in ("step", "rank") else "float64" for c in STATS_COLS}


class RunFormatError(ValueError):
    """The path is not a run directory, or one of its files is in an unknown format."""


@dataclass
class Run:
    """One loaded run. Frames are documented in the module docstring."""
    path: Path
    meta: dict
    events: pd.DataFrame
    pebbles: pd.DataFrame
    memory: pd.DataFrame
    stats: pd.DataFrame
    schedule: dict | None          # schedule.json as written (None when absent)
    origin_ns: int                 # rank-0-clock ns that is time 0 in the frames
    steps: list = field(default_factory=list)     # complete steps: every rank finished them
    warnings: list = field(default_factory=list)  # what is missing or odd, one line each

    @property
    def world_size(self) -> int:
        return int(self.meta.get("world_size") or (self.events["rank"].max() + 1))


def read_trace(path: Path, kind: str, warnings: list) -> pd.DataFrame | None:
    """One per-rank trace file -> raw frame (local ns), or None if absent/empty."""
    if not path.exists():
        return None
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", "replace").strip()
        f.seek(0, io.SEEK_END)
        size = f.tell()
        if size:
            f.seek(size - 1)
            truncated = f.read(1) != b"\n"
    if not first:
        warnings.append(f"{path}: empty file (the rank wrote nothing)")
        return None
    fields = parse_header(first)
    if fields is None:
        raise RunFormatError(f"{path}: first line is not a '# harness-trace format=...' header")
    if fields.get("format") != str(FORMAT):
        raise RunFormatError(f"{path}: unknown trace format version {fields.get('format')!r} "
                             f"(this reader knows format={FORMAT})")
    if fields.get("kind", kind) != kind:
        raise RunFormatError(f"{path}: header says kind={fields['kind']}, expected kind={kind}")
    data = path.read_bytes()
    if truncated:  # a crash mid-write leaves one partial last line: drop it (run-format.md)
        data = data[:data.rfind(b"\n") + 1]
        warnings.append(f"{path}: dropped a truncated last line")
    return parse_rows(data, path, _DTYPES[kind], warnings)


def parse_rows(data: bytes, path: Path, dtypes: dict, warnings: list) -> pd.DataFrame | None:
    """CSV bytes (comment lines, a column header, rows) -> frame with `dtypes`, or None if no
    header. The writers never quote, so the fast path reads without quoting; any damaged row
    sends the file through the careful path, which drops it and says so."""
    if b'"' not in data:
        try:
            return pd.read_csv(io.BytesIO(data), comment="#", dtype=dtypes,
                               quoting=csv.QUOTE_NONE)
        except pd.errors.EmptyDataError:
            return None
        except ValueError:  # ParserError (field count) or a value of the wrong type
            pass
    return _parse_careful(data, path, dtypes, warnings)


def _parse_careful(data: bytes, path: Path, dtypes: dict, warnings: list):
    lines = data.split(b"\n")
    head = next((i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith(b"#")), None)
    if head is None:
        return None
    cols = lines[head].decode("utf-8", "replace").strip().split(",")
    good, numbers, bad = [], [], []
    for i in range(head + 1, len(lines)):
        ln = lines[i]
        if not ln.strip() or ln.startswith(b"#"):
            continue
        if ln.count(b",") != len(cols) - 1 or b'"' in ln:
            bad.append(i + 1)  # 1-based line numbers, as an editor shows them
        else:
            good.append(ln)
            numbers.append(i + 1)
    raw = pd.read_csv(io.BytesIO(b"\n".join([lines[head]] + good) + b"\n"), dtype=str,
                      keep_default_na=False, quoting=csv.QUOTE_NONE)
    ok = np.ones(len(raw), dtype=bool)
    out = {}
    for c in raw.columns:
        want = dtypes.get(c, str)
        if want is str:
            out[c] = raw[c]
            continue
        text = raw[c].str.strip()
        num = pd.to_numeric(text, errors="coerce")
        empty = text.eq("") | text.str.lower().eq("nan")
        ok &= ~(num.isna() & ~empty).to_numpy()            # not a number at all
        if want in (_INT, "Int64"):
            ok &= ~(num.notna() & (num % 1 != 0)).to_numpy()  # 1.5 in an integer column
            if want == _INT:
                ok &= num.notna().to_numpy()                    # required integer is empty
        out[c] = num
    bad += [numbers[i] for i in np.flatnonzero(~ok)]
    df = pd.DataFrame(out)[ok].reset_index(drop=True)
    for c in df.columns:
        want = dtypes.get(c, str)
        if want in (_INT, "Int64"):
            df[c] = df[c].astype(want)
    if bad:
        bad.sort()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        warnings.append(f"{path}: dropped {len(bad)} malformed row(s) (line {shown})")
    return df


def clock_offset_ns(meta: dict, rank: int, t_local: np.ndarray) -> np.ndarray:
    """ns to add to rank `rank`'s local times to get rank 0's clock (Score-P's linear model).

    Uses, per phase, the estimate with the smallest round trip; interpolates linearly between
    "start" and "end" (and extrapolates the same line outside them, since drift is linear);
    one estimate -> a constant offset; none -> 0.
    """
    est = [e for e in (meta.get("clock") or {}).get("estimates") or [] if e.get("rank") == rank]
    best = {}
    for e in est:
        ph = e.get("phase", "start")
        if ph not in best or e.get("rtt_ns", 0) < best[ph].get("rtt_ns", 0):
            best[ph] = e
    pts = [best[ph] for ph in ("start", "end") if ph in best] or list(best.values())[:1]
    if not pts:
        return np.zeros(len(t_local))
    t = np.asarray(t_local, dtype=np.int64)
    return np.asarray(interpolate_offset(t, pts[0], pts[-1] if len(pts) > 1 else None),
                      dtype=np.float64)


def _align(meta, rank, t):
    """Local int ns -> rank-0 int ns (nullable: NA stays NA)."""
    arr = pd.array(t, dtype="Int64")
    vals = arr.to_numpy(dtype=np.int64, na_value=0)
    out = vals + np.rint(clock_offset_ns(meta, rank, vals)).astype(np.int64)
    na = np.asarray(arr.isna())
    return pd.arrays.IntegerArray(out, na) if na.any() else out


def _secs(t, origin):
    """Aligned ns -> float seconds since origin (NA -> NaN); int64 subtraction first keeps ns."""
    arr = pd.array(t, dtype="Int64")
    return ((arr - origin).to_numpy(dtype=np.float64, na_value=np.nan)) / 1e9


def _read_stats(d: Path, warnings: list) -> pd.DataFrame:
    cols = list(STATS_COLS)
    if (d / "stats.csv").exists():
        df = parse_rows((d / "stats.csv").read_bytes(), d / "stats.csv", _DTYPES["stats"],
                        warnings)
        return df if df is not None else pd.DataFrame(columns=cols)
    parts = sorted((d / "ranks").glob("stats.r*.csv"))
    warnings.append("stats.csv absent: read ranks/stats.r*.csv" if parts
                    else "no stats.csv and no ranks/stats.r*.csv")
    frames = []
    for p in parts:
        data = p.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[:data.rfind(b"\n") + 1]
            warnings.append(f"{p}: dropped a truncated last line")
        df = parse_rows(data, p, _DTYPES["stats"], warnings)
        if df is None:
            warnings.append(f"{p}: empty file")
        else:
            frames.append(df)
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _read_meta(d: Path) -> dict:
    mp = d / "meta.json"
    if not d.is_dir() or not mp.exists():
        raise RunFormatError(f"{mp}: not a run directory (no meta.json)")
    try:
        meta = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{mp}: not valid JSON ({e})") from None
    if meta.get("format", FORMAT) != FORMAT:
        raise RunFormatError(f"{mp}: unknown run format version {meta.get('format')!r} "
                             f"(this reader knows format={FORMAT})")
    return meta


def load_run(path) -> Run:
    """Load the run directory `path` into a Run (see the module docstring for the frames)."""
    d = Path(path)
    meta = _read_meta(d)
    warnings: list = []
    from harness.heartbeat import judge
    died = judge(d, meta)
    if died:  # meta.json says running, but its processes are gone: say so (the file stays)
        meta = dict(meta, status="died", error={"type": "Died", "message": died})
    status = meta.get("status", "unknown")
    if status != "complete":
        err = meta.get("error")
        if isinstance(err, dict):
            err = (f"{err.get('type')}: " if err.get("type") not in (None, "Died") else "") \
                + str(err.get("message"))
        warnings.append(f"run status is {status!r}" + (f": {err}" if err else "")
                        + " — loaded what was written")
    world = int(meta.get("world_size") or 0)
    raw = {k: {} for k in ("events", "pebbles", "memory")}
    ranks = range(world) if world else sorted(
        {int(m.group(1)) for p in (d / trace_file("events", 0)).parent.glob("*.r*.csv")
         if (m := re.search(r"\.r(\d+)\.csv$", p.name))})
    for r in ranks:
        for kind in raw:
            p = d / trace_file(kind, r)
            df = read_trace(p, kind, warnings)
            if df is None:
                if not p.exists():
                    warnings.append(f"rank {r}: {p.relative_to(d)} missing")
                continue
            df.insert(0, "rank", r)
            # align every time column while still int ns, per rank (each rank has its own line)
            for c in ("t0", "t1", "tb", "t_store", "t_free", "t"):
                if c in df:
                    df[c] = _align(meta, r, df[c])
            raw[kind][r] = df
    warnings += local_dir_notes(d, meta, raw["events"])
    # pop: each rank's frames are released once concatenated (at 10 M events they are GBs)
    ev = _cat(raw.pop("events"), ["rank"] + list(_DTYPES["events"]))
    peb = _cat(raw.pop("pebbles"), ["rank"] + list(_DTYPES["pebbles"]))
    mem = _cat(raw.pop("memory"), ["rank"] + list(_DTYPES["memory"]))
    starts = [int(f[c].min()) for f, c in ((ev, "t0"), (peb, "t_store"), (mem, "t")) if len(f)]
    origin = int(ev["t0"].min()) if len(ev) else (min(starts) if starts else 0)
    kind = _categorical(ev["kind"])
    lanes = [LANE.get(k, "other") for k in kind.cat.categories]
    lane = pd.Categorical.from_codes(
        np.asarray(pd.Categorical(lanes, categories=sorted(set(lanes))).codes)[kind.cat.codes]
        if len(lanes) else np.zeros(len(kind), int), categories=sorted(set(lanes)) or ["other"])
    events = pd.DataFrame({
        "rank": ev["rank"], "step": ev["step"], "mb": ev["mb"], "layer": ev["layer"],
        "kind": kind, "lane": lane,
        "start": _secs(ev["t0"], origin), "end": _secs(ev["t1"], origin),
        "tb": _secs(ev["tb"], origin), "peer": ev["peer"], "tag": ev["tag"],
        "bytes": ev["bytes"], "pair": _categorical(ev["pair"], drop="")})
    # one stable argsort of (rank, start) and one take: sorting the frame with sort_values
    # costs ~2x more
    order = np.lexsort((events["start"].to_numpy(), events["rank"].to_numpy()))
    del ev
    events = events.take(order).reset_index(drop=True)
    pebbles = pd.DataFrame({
        "rank": peb["rank"], "step": peb["step"], "mb": peb["mb"], "layer": peb["layer"],
        "kind": _categorical(peb["kind"]), "bytes": peb["bytes"],
        "stored": _secs(peb["t_store"], origin), "freed": _secs(peb["t_free"], origin),
        # labels repeated per layer and microbatch: as Python strings ~110 MB per million
        # pebbles, as categoricals a byte or two a row
        "module": _categorical(peb["module"].fillna("")),
        "shape": _categorical(peb["shape"].fillna("")),
        "dtype": _categorical(peb["dtype"].fillna(""))})
    del peb
    pebbles = pebbles.sort_values(["rank", "stored"], kind="stable", ignore_index=True)
    memory = pd.DataFrame({"rank": mem["rank"], "time": _secs(mem["t"], origin),
                           "source": mem["source"], "bytes": mem["bytes"]})
    memory = memory.sort_values(["rank", "source", "time"], kind="stable", ignore_index=True)
    schedule = None
    if (d / "schedule.json").exists():
        try:
            schedule = json.loads((d / "schedule.json").read_text())
        except json.JSONDecodeError:
            warnings.append(f"{d / 'schedule.json'}: not valid JSON, planned schedule skipped")
    steps = _complete_steps(events, world, warnings)
    stats = _read_stats(d, warnings)
    warnings += divergence(stats, meta)
    return Run(d, meta, events, pebbles, memory, stats, schedule, origin, steps, warnings)


def local_dir_notes(d: Path, meta: dict, have: dict) -> list:
    """run.local_dir: for each rank whose trace is not in the run directory (it died, or the
    transfer failed), where its own files stay: one line naming its host and directory."""
    out = []
    for info in meta.get("ranks") or []:
        r, local = info.get("rank"), info.get("local_dir")
        if local and r not in have:
            out.append(f"rank {r}: its files were not moved to the run directory; they stay in "
                       f"{info.get('host')}:{local} (run.local_dir)")
    return out


def divergence(stats: pd.DataFrame, meta: dict) -> list:
    """One line if the training diverged: the first step with a non-finite loss or grad norm."""
    bad = pd.Series(False, index=stats.index)
    p = int(meta.get("world_size") or (stats["rank"].max() + 1 if len(stats) else 1))
    sch = meta.get("schedule") or {}
    # the rank holding the loss stage: the last rank, or rank 0 when the chunks run in a V
    # (zbv, dualpipev: the last stage is rank 0's second chunk)
    last = 0 if sch.get("placement") == "v" and int(sch.get("virtual") or 1) % 2 == 0 else p - 1
    for c in ("loss", "grad_norm"):
        if c in stats:
            v = pd.to_numeric(stats[c], errors="coerce")
            # an empty loss (ranks that are not the last stage) is NaN but not divergence
            bad |= np.isinf(v) | (v.isna() & (c == "grad_norm" or stats["rank"].eq(last)))
    if not bad.any():
        return []
    first = stats[bad].sort_values(["step", "rank"]).iloc[0]
    return [f"training diverged: non-finite loss or gradient norm from step "
            f"{int(first['step'])} (rank {int(first['rank'])}, {int(bad.sum())} rows)"]


def _categorical(col: pd.Series, drop: str | None = None) -> pd.Series:
    """`col` as a categorical with sorted categories (`drop`, e.g. "", becomes NA).

    The events' id-like text (kind, lane, pair) is categorical: a few kinds and one pair id per
    message repeat over millions of rows, and comparing, joining and sorting integer codes is
    ~10x faster than Python strings. Sorted categories group and sort as the strings would.
    A categorical takes no new value (map/replace to a value not among its categories fail):
    code that rewrites kinds does it on `.astype(object)`."""
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype("category")
    cats = col.cat.categories
    if drop is not None and drop in cats:
        col = col.cat.remove_categories([drop])
        cats = col.cat.categories
    if not cats.is_monotonic_increasing:
        col = col.cat.reorder_categories(sorted(cats))
    return col


def _cat(parts: dict, cols: list) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("kind", "pair", "source")
                                          else "Int64" if c in ("tb", "t_free") else _INT)
                             for c in cols})
    return pd.concat(parts.values(), ignore_index=True)


def _complete_steps(events: pd.DataFrame, world: int, warnings: list) -> list:
    """Steps every rank finished: it has their `step` span (or, if no rank writes `step` spans,
    any event). Gaps are reported per rank."""
    if events.empty:
        warnings.append("no events at all")
        return []
    ranks = range(world) if world else sorted(events["rank"].unique())
    done = events[events["kind"] == "step"] if (events["kind"] == "step").any() else events
    have = {int(r): set(v.tolist()) for r, v in done.groupby("rank")["step"].unique().items()}
    all_steps = sorted(int(s) for s in events["step"].unique())
    complete = [s for s in all_steps if all(s in have.get(r, ()) for r in ranks)]
    for r in ranks:
        got = have.get(r, set())
        miss = [int(s) for s in all_steps if s not in got]
        if miss and len(miss) == len(all_steps):
            warnings.append(f"rank {r}: no complete step")
        elif miss:
            warnings.append(f"rank {r}: step(s) {_ranges(miss)} incomplete or missing")
    return complete


def _ranges(xs: list) -> str:
    """[1,2,3,7] -> '1-3,7'"""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)
