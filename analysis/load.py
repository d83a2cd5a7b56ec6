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
import pyarrow as pa
import pyarrow.compute as pacompute
import pyarrow.csv as pacsv

from harness.runformat import FORMAT, LANE, STATS_COLS, TRACE_COLS, parse_header, trace_file
from harness.trace.clock import interpolate_offset

_INT = "int64"
# dtypes of the columns as written (runformat.TRACE_COLS); t columns stay integer nanoseconds
# until aligned (float64 loses ns past 2^53); every column not named here is an integer
_TEXT, _NULLABLE = {"kind", "pair", "source", "module", "shape", "dtype"}, {"tb", "t_free"}
_DTYPES = {kind: {c: str if c in _TEXT else "Int64" if c in _NULLABLE else _INT for c in cols}
           for kind, cols in TRACE_COLS.items()}
_DTYPES["stats"] = {c: _INT if c in ("step", "rank") else "float64" for c in STATS_COLS}
# the same as pyarrow types for the fast path: text dictionary-encoded (-> pandas categoricals)
_ARROW = {kind: {c: pa.dictionary(pa.int32(), pa.string()) if t is str else pa.int64()
                 for c, t in cols.items()} for kind, cols in _DTYPES.items() if kind != "stats"}
# pandas.read_csv's default NA strings (pandas._libs.parsers.STR_NA_VALUES; a test checks them):
# the fast path reads the same cells as empty as the pandas path does
_NA_VALUES = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
              "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null")


# the frames' columns (module docstring)
EVENT_FRAME = ("rank", "step", "mb", "layer", "kind", "lane", "start", "end", "tb", "peer", "tag",
               "bytes", "pair")
PEBBLE_FRAME = ("rank", "step", "mb", "layer", "kind", "bytes", "stored", "freed", "module",
                "shape", "dtype")
MEMORY_FRAME = ("rank", "time", "source", "bytes")


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
    """One per-rank trace file -> raw frame (local ns; text as categoricals), or None if
    absent/empty."""
    table = read_table(path, kind, warnings)
    if table is None:
        return None
    return pd.DataFrame({c: (pd.arrays.IntegerArray(*_nullable(table.column(c))) if t == "Int64"
                             else table.column(c).to_pandas())
                         for c, t in _DTYPES[kind].items()}, copy=False)


def read_table(path: Path, kind: str, warnings: list) -> pa.Table | None:
    """One per-rank trace file -> pyarrow table with the format's columns (local ns; text
    dictionary-encoded), or None if absent/empty."""
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
    table = _parse_arrow(data, kind)
    if table is None:   # anything but a clean file: pandas, and the careful path for damage
        df = parse_rows(data, path, _DTYPES[kind], warnings)
        if df is None:
            return None
        table = pa.table({c: pa.array(df[c], type=t if t == pa.int64() else pa.string())
                          for c, t in _ARROW[kind].items()}).cast(pa.schema(_ARROW[kind]))
    return table


def _parse_arrow(data: bytes, kind: str) -> pa.Table | None:
    """The fast path for a trace file as the writers write it: the leading comment lines, the
    header with exactly the format's columns, rows of the right types, no quote and no other
    comment anywhere. pyarrow's multi-threaded CSV reader reads it. Anything else (a damaged
    row, a '#' that pandas would read as a comment) gives None, and parse_rows reads the file
    as before, dropping and counting damaged rows."""
    start = 0
    while data.startswith(b"#", start):
        start = data.find(b"\n", start) + 1
        if start == 0:
            return None
    end = data.find(b"\n", start)
    types = _ARROW[kind]
    if (end < 0 or data[start:end].rstrip(b"\r") != ",".join(types).encode()
            or data.find(b"#", end) >= 0 or data.find(b'"', end) >= 0):
        return None
    try:
        table = pacsv.read_csv(
            pa.py_buffer(data).slice(start),
            parse_options=pacsv.ParseOptions(quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types, null_values=_NA_VALUES,
                                                 strings_can_be_null=True))
    except pa.ArrowInvalid:   # wrong field count, not a number, not UTF-8
        return None
    if any(table.column(c).null_count for c, t in _DTYPES[kind].items() if t == _INT):
        return None           # a required integer is empty: the careful path drops the row
    return table


def _nullable(col: pa.ChunkedArray) -> tuple:
    """An integer column that may be empty -> (int64 values with 0 where empty, empty mask)."""
    return col.fill_null(0).to_numpy(), col.is_null().to_numpy(zero_copy_only=False)


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


def _align(meta, rank, t: np.ndarray) -> np.ndarray:
    """Local int ns -> rank-0 int ns."""
    return t + np.rint(clock_offset_ns(meta, rank, t)).astype(np.int64)


def _secs(t, origin):
    """Aligned ns -> float seconds since origin (NA -> NaN); int64 subtraction first keeps ns."""
    if isinstance(t, np.ndarray):
        return (t - origin) / 1e9
    return ((t - origin).to_numpy(dtype=np.float64, na_value=np.nan)) / 1e9


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
    from harness.ops.heartbeat import judge
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
    parts = {k: {} for k in ("events", "pebbles", "memory")}
    ranks = range(world) if world else sorted(
        {int(m.group(1)) for p in (d / trace_file("events", 0)).parent.glob("*.r*.csv")
         if (m := re.search(r"\.r(\d+)\.csv$", p.name))})
    for r in ranks:
        for kind in parts:
            p = d / trace_file(kind, r)
            table = read_table(p, kind, warnings)
            if table is None:
                if not p.exists():
                    warnings.append(f"rank {r}: {p.relative_to(d)} missing")
                continue
            parts[kind][r] = table
    warnings += local_dir_notes(d, meta, parts["events"])
    # pop: each rank's tables are released once concatenated, and each column once taken in
    # order (at 10 M events they are GBs)
    ev = _cat(parts.pop("events"), "events", meta)
    peb = _cat(parts.pop("pebbles"), "pebbles", meta)
    mem = _cat(parts.pop("memory"), "memory", meta)
    pa.default_memory_pool().release_unused()   # the tables' memory, back to the system
    starts = [int(f[c].min()) for f, c in ((ev, "t0"), (peb, "t_store"), (mem, "t"))
              if len(f["rank"])]
    origin = int(ev["t0"].min()) if len(ev["rank"]) else (min(starts) if starts else 0)
    kind = ev["kind"]
    lanes = [LANE.get(k, "other") for k in kind.categories]
    ev["lane"] = pd.Categorical.from_codes(
        np.asarray(pd.Categorical(lanes, categories=sorted(set(lanes))).codes)[kind.codes]
        if len(lanes) else np.zeros(len(kind), int), categories=sorted(set(lanes)) or ["other"])
    del kind
    for c, name in (("t0", "start"), ("t1", "end"), ("tb", "tb")):
        ev[name] = _secs(ev.pop(c), origin)
    # rows sorted by (rank, start), stable: one argsort, and each column taken once
    events = _frame(ev, np.lexsort((ev["start"], ev["rank"])), EVENT_FRAME)
    peb["stored"], peb["freed"] = (_secs(peb.pop(c), origin) for c in ("t_store", "t_free"))
    # labels repeated per layer and microbatch: as Python strings ~110 MB per million pebbles,
    # as categoricals a byte or two a row; empty labels read as ""
    for c in ("module", "shape", "dtype"):
        peb[c] = _filled(peb[c], "")
    pebbles = _frame(peb, np.lexsort((peb["stored"], peb["rank"])), PEBBLE_FRAME)
    mem["time"] = _secs(mem.pop("t"), origin)
    # sorted by (rank, source, time); sorted categories order as their text, NA last
    source = mem["source"]
    key = np.where(source.codes < 0, len(source.categories), source.codes)
    memory = _frame(mem, np.lexsort((mem["time"], key, mem["rank"])), MEMORY_FRAME)
    del source, key
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


def _filled(col: pd.Categorical, fill: str) -> pd.Categorical:
    """`col` (sorted categories) with NA as `fill`, its categories still sorted."""
    if not col.isna().any():
        return col
    if fill not in col.categories:
        col = col.add_categories([fill])
    col = col.fillna(fill)
    return col.reorder_categories(sorted(col.categories))


_TIMES = ("t0", "t1", "tb", "t_store", "t_free", "t")


def _cat(parts: dict, kind: str, meta: dict) -> dict:
    """Per-rank tables {rank: read_table(...)} of one trace kind -> {column: array over all
    ranks}, with the rank first. Times are aligned to rank 0's clock per rank (each rank has its
    own line), still int ns (int64, or IntegerArray where the column may be empty); text columns
    are categoricals with sorted categories, one set for all ranks."""
    ranks, tables = list(parts), list(parts.values())
    parts.clear()
    out = {"rank": np.repeat(np.array(ranks, dtype=np.int64), [len(t) for t in tables])}
    for c, t in _DTYPES[kind].items():
        cols = [tab.column(c) for tab in tables]
        tables = [tab.drop_columns([c]) for tab in tables]   # the column goes with `cols`
        if t is str:
            out[c] = _text(cols)
            continue
        if t == "Int64":
            cols, na = zip(*map(_nullable, cols)) if cols else ((), ())
        else:
            cols = [x.to_numpy() for x in cols]
        if c in _TIMES:
            cols = [_align(meta, r, x) for r, x in zip(ranks, cols)]
        v = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        out[c] = pd.arrays.IntegerArray(v, np.concatenate(na) if na else np.zeros(0, bool)) \
            if t == "Int64" else v
    return out


def _text(cols: list) -> pd.Categorical:
    """Dictionary-encoded columns (pyarrow) -> one pandas categorical over all of them, its
    categories sorted (byte order of UTF-8 = Python's order of str), empty cells NA.

    The frames' id-like text (kind, lane, pair, labels, sources) is categorical: a few kinds and
    one pair id per message repeat over millions of rows, and comparing, joining and sorting
    integer codes is ~10x faster than Python strings. Sorted categories group and sort as the
    strings would. A categorical takes no new value (map/replace to a value not among its
    categories fail): code that rewrites kinds does it on `.astype(object)`. Unified and sorted
    in pyarrow: ~5x faster than pandas on string categories."""
    arr = pa.chunked_array([ch for x in cols for ch in x.chunks],
                           type=pa.dictionary(pa.int32(), pa.string())).unify_dictionaries()
    if arr.num_chunks == 0:
        return pd.Categorical([])
    words = arr.chunk(0).dictionary          # shared by every chunk now
    order = pacompute.array_sort_indices(words).to_numpy()
    new = np.empty(len(order) + 1, np.int32)   # old code -> sorted code; last slot: null -> -1
    new[order] = np.arange(len(order), dtype=np.int32)
    new[-1] = -1
    codes = pa.chunked_array([ch.indices for ch in arr.chunks], type=pa.int32())
    codes = codes.fill_null(-1).to_numpy() if codes.null_count else codes.to_numpy()
    return pd.Categorical.from_codes(new[codes], dtype=pd.CategoricalDtype(
        pd.Index(words.take(order).to_pandas())))


def _frame(cols: dict, order: np.ndarray, names: tuple) -> pd.DataFrame:
    """A frame of the arrays `names` popped from `cols`, its rows in `order`: each column taken
    once and then released, and the frame built without copying them again into one block per
    dtype."""
    out = {}
    for c in names:
        v = cols.pop(c)
        out[c] = v[order] if isinstance(v, np.ndarray) else v.take(order)
        del v
    return pd.DataFrame(out, copy=False)


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
