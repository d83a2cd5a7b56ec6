"""Export a run as a Chrome trace (JSON object format), for ui.perfetto.dev and chrome://tracing.

One process per rank (pid = rank), one thread per lane (tid: compute, send, recv, copy, step),
`ph:"X"` slices with ts/dur in µs since the run's start (rounded to the ns the trace was taken
in), flow arrows from each send slice (`ph:"s"`) to its receive slice (`ph:"f"`, `"bp":"e"`,
same id), and counter tracks (`ph:"C"`): activation bytes held (from pebbles) and each memory
sample source. Format: Google's "Trace Event Format" document, as summarised in FIELD.md.

Rendered as text, not through json.dump: the few distinct (name, kind, rank, lane, mb, layer,
bytes) combinations each get a %-template with those fields filled in once, and each event then
formats only what varies (its times, step, pair and wait split), one `%` per event. Building a
dict per event and serialising it costs ~5x more, and a million-event run must export in about a
second. Every string put in a template is one of ours (kind names, pair ids like `A3.0.0>1`), so
needs no escaping. tests/test_analysis_chrome.py checks the text against a dict-per-event
construction (json.loads equality).
"""
from __future__ import annotations

import io
import json
from typing import Iterator

import numpy as np
import pandas as pd

from analysis.critical import paused_gc
from analysis.metrics import live_bytes, recv_split
from analysis.waits import _lookup

TID = {"compute": 0, "send": 1, "recv": 2, "copy": 3, "step": 4, "other": 5, "critical": 6,
       "recompute": 7}
US = 1e6  # seconds -> microseconds
CHUNK = 100_000  # events formatted and written at a time

_X = ('{"name":"%s","cat":"%s","ph":"X","ts":%.3f,"dur":%.3f,"pid":%d,"tid":%d,'
      '"args":{"step":%d,"mb":%d,"layer":%d,"bytes":%d%s}}')
# critical-path slices and counters: filled in twice, the fixed fields once per template
# (their %s), then the varying ones per line, where the template holds %.3f and %d
_P = ('{"name":"critical: %s","cat":"critical","ph":"X","ts":%s,"dur":%s,"pid":%d,'
      '"tid":6,"args":{"step":%s,"kind":"%s"}}')
_C = '{"name":"%s","ph":"C","ts":%s,"pid":%d,"tid":0,"args":{"bytes":%s}}'
_S = '{"name":"p2p","cat":"flow","ph":"s","id":%d,"ts":%.3f,"pid":%d,"tid":%d}'
_F = '{"name":"p2p","cat":"flow","ph":"f","bp":"e","id":%d,"ts":%.3f,"pid":%d,"tid":%d}'


def _name(kind, layer, mb, peer, step):
    """'fwd L3 mb0', 'send mb0 ->1', 'recv mb0 <-0', 'opt', 'step 4'."""
    if kind == "step":
        return f"step {step}"
    s = kind + (f" L{layer}" if layer >= 0 else "") + (f" mb{mb}" if mb >= 0 else "")
    return s + (f" ->{peer}" if kind == "send" else f" <-{peer}" if kind == "recv" else "")


def _metadata(events, ranks) -> list:
    md = []
    for r in ranks:
        md.append({"ph": "M", "name": "process_name", "pid": int(r), "tid": 0,
                   "args": {"name": f"rank {r}"}})
        md.append({"ph": "M", "name": "process_sort_index", "pid": int(r), "tid": 0,
                   "args": {"sort_index": int(r)}})
    lanes = events[["rank", "lane"]].drop_duplicates()
    for r, lane in zip(lanes["rank"], lanes["lane"]):
        md.append({"ph": "M", "name": "thread_name", "pid": int(r), "tid": TID.get(lane, 5),
                   "args": {"name": lane}})
        md.append({"ph": "M", "name": "thread_sort_index", "pid": int(r),
                   "tid": TID.get(lane, 5), "args": {"sort_index": TID.get(lane, 5)}})
    return [json.dumps(x) for x in md]


_TAIL_X = ("}}", ',"pair":"%s"}}', ',"pair":"%s","wait_us":%.3f,"transfer_us":%.3f}}')


def _esc(x) -> str:
    return str(x).replace("%", "%%")


def _groups(cols: list) -> tuple[np.ndarray, np.ndarray]:
    """Rows' value tuples over `cols` -> (group code per row, first row of each group); codes
    number the groups in order of first appearance. One integer key per row (mixed radix over
    each column's factorized codes), compressed whenever it would overflow."""
    n = len(cols[0])
    key, radix = np.zeros(n, np.int64), 1
    for c in cols:
        codes, uniq = pd.factorize(c)
        k = len(uniq) + 1                       # + NA (code -1)
        if radix * k >= 2**62:
            key, u = pd.factorize(key)
            radix = len(u)
        key = key * k + (codes + 1)
        radix *= k
    g, u = pd.factorize(key)
    first = np.empty(len(u), np.int64)
    first[g[::-1]] = np.arange(n)[::-1]
    return g, first


def _render(template, fixed: list, varying: list) -> Iterator[list]:
    """Lines, CHUNK at a time: per row template(*its fixed values) % (its varying values); one
    template per distinct combination of the fixed columns."""
    n = len(varying[0])
    if not n:
        return
    g, first = _groups(fixed)
    vals = [np.asarray(c.to_numpy(dtype=object) if isinstance(c, pd.Series) else c)
            for c in fixed]
    T = np.array([template(*(v[i] for v in vals)) for i in first.tolist()], dtype=object)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        yield [t % v for t, v in zip(T[g[a:b]].tolist(),
                                     zip(*(x[a:b].tolist() for x in varying)))]


def _slices(ev, rs) -> Iterator[list]:
    """The events as X slices, in their order, CHUNK at a time (lists of JSON strings)."""
    n = len(ev)
    if not n:
        return
    kind = ev["kind"]
    kinds = kind.to_numpy(dtype=object)
    pair = ev["pair"]
    has = pair.notna().to_numpy()
    isr = (kind == "recv").to_numpy()
    split = rs.drop_duplicates("pair")
    split = split[split["pair"].notna()]
    j = _lookup(split["pair"], pair)
    w = np.full(n, np.nan)
    x = np.full(n, np.nan)
    hit = j >= 0
    w[hit] = split["wait"].to_numpy(float)[j[hit]]
    x[hit] = split["transfer"].to_numpy(float)[j[hit]]
    w, x = np.round(w * US, 3), np.round(x * US, 3)
    # 0: no pair; 1: pair; 2: a receive with its wait split
    cls = np.where(has, np.where(isr & ~np.isnan(w), 2, 1), 0)
    stepcol = ev["step"].to_numpy()
    named_step = np.where(kinds == "step", stepcol, 0)
    tid = np.array([TID.get(x_, 5) for x_ in ev["lane"].to_numpy(dtype=object)]) \
        if not isinstance(ev["lane"].dtype, pd.CategoricalDtype) else np.array(
            [TID.get(c, 5) for c in ev["lane"].cat.categories] + [5])[ev["lane"].cat.codes]
    cols = {c: ev[c].to_numpy() for c in ("rank", "mb", "layer", "peer", "bytes")}
    g, first = _groups([kind, cols["layer"], cols["mb"], cols["peer"], named_step,
                        cols["rank"], tid, cols["bytes"], cls])
    templates = []
    for i in first.tolist():
        k = kinds[i]
        head = ('{"name":"%s","cat":"%s","ph":"X","ts":%%.3f,"dur":%%.3f,"pid":%d,"tid":%d,'
                '"args":{"step":%%d,"mb":%d,"layer":%d,"bytes":%d') % (
            _esc(_name(k, cols["layer"][i], cols["mb"][i], cols["peer"][i], named_step[i])),
            _esc(k), cols["rank"][i], tid[i], cols["mb"][i], cols["layer"][i], cols["bytes"][i])
        templates.append(head + _TAIL_X[cls[i]])
    T = np.array(templates, dtype=object)
    start, end = ev["start"].to_numpy(), ev["end"].to_numpy()
    pairs = pair.to_numpy(dtype=object)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        ts = np.round(start[a:b] * US, 3)
        dur = np.round((end[a:b] - start[a:b]) * US, 3)
        tl, c = T[g[a:b]], cls[a:b]
        out = np.empty(b - a, dtype=object)
        for k in range(3):
            i = np.flatnonzero(c == k)
            if not len(i):
                continue
            args = [ts[i].tolist(), dur[i].tolist(), stepcol[a:b][i].tolist()]
            if k:
                args.append(pairs[a:b][i].tolist())
            if k == 2:
                args += [w[a:b][i].tolist(), x[a:b][i].tolist()]
            out[i] = [t % v for t, v in zip(tl[i].tolist(), zip(*args))]
        yield out.tolist()


def write_chrome(f, events, pebbles, memory, meta: dict | None = None,
                 critical=None) -> int:
    """Write the trace to the open text file `f`; returns the number of trace events.

    critical: analysis.critical.critical_path segments, shown as a "critical path" track
    (tid 6) in each rank the path passes through: one slice per segment, named by what ran.

    Streams in chunks of CHUNK events, so a million-event run never holds all its JSON lines."""
    ranks = sorted(set(events["rank"]) | set(pebbles["rank"]) | set(memory["rank"]))
    rs = recv_split(events)
    m = rs[rs["matched"]]
    ids = range(1, len(m) + 1)
    lb = live_bytes(pebbles)
    other = {"source": "harness analysis (python -m analysis.pebble)",
             "time": "µs since the run's first event, rank 0's clock"}
    if meta:
        other.update({k: meta.get(k) for k in ("experiment", "start_time", "world_size",
                                                "schedule")})

    def chunks():
        yield _metadata(events, ranks)
        if critical is not None and len(critical):
            yield [json.dumps({"ph": "M", "name": "thread_name", "pid": int(r),
                               "tid": TID["critical"], "args": {"name": "critical path"}})
                   for r in sorted(critical["rank"].unique())]
            c = critical
            yield from _render(
                lambda w, r, k: _P % (_esc(w), "%.3f", "%.3f", r, "%d", _esc(k)),
                [c["what"], c["rank"].astype(int), c["kind"]],
                [np.round(c["start"].to_numpy() * US, 3),
                 np.round((c["end"] - c["start"]).to_numpy() * US, 3),
                 c["step"].astype(int).to_numpy()])
        yield from _slices(events, rs)
        # flow start on the send slice at its start, end bound to the enclosing receive slice
        yield [_S % (i, t, p, TID["send"]) for i, t, p in
               zip(ids, np.round(m["send_start"].to_numpy() * US, 3).tolist(),
                   m["send_rank"].astype(int).tolist())]
        yield [_F % (i, t, p, TID["recv"]) for i, t, p in
               zip(ids, np.round(m["start"].to_numpy() * US, 3).tolist(),
                   m["rank"].astype(int).tolist())]
        yield from _render(
            lambda r: _C % ("activations (pebbles)", "%.3f", r, "%d"), [lb["rank"].astype(int)],
            [np.round(lb["time"].to_numpy() * US, 3), lb["bytes"].astype(np.int64).to_numpy()])
        yield from _render(
            lambda sr, r: _C % (_esc("memory " + sr), "%.3f", r, "%d"),
            [memory["source"], memory["rank"]],
            [np.round(memory["time"].to_numpy() * US, 3), memory["bytes"].to_numpy()])

    f.write('{"traceEvents":[')
    n = 0
    with paused_gc():
        for part in chunks():
            if part:
                f.write(",\n" if n else "\n")   # no concatenation: parts are ~30 MB
                f.write(",\n".join(part))
                n += len(part)
    f.write('\n],"displayTimeUnit":"ms","otherData":' + json.dumps(other) + "}\n")
    return n


def chrome_json(events, pebbles, memory, meta: dict | None = None, critical=None) -> str:
    """The whole trace as one JSON string: {"traceEvents": [...], "displayTimeUnit", ...}."""
    buf = io.StringIO()
    write_chrome(buf, events, pebbles, memory, meta, critical)
    return buf.getvalue()


_TAIL = b'\n],"displayTimeUnit"'


def append_events(path, lines: list) -> int:
    """Add trace events (JSON strings) to a trace.json written by `write_chrome`, in place:
    they go before its closing `]`, and the tail (displayTimeUnit, otherData) is kept.
    -> the number added. Used to merge Kineto's events (analysis.kineto)."""
    if not lines:
        return 0
    with open(path, "r+b") as f:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        tail = f.read()
        at = tail.rfind(_TAIL)
        if at < 0:
            raise ValueError(f"{path}: not a trace.json written by analysis.chrome")
        pos = size - len(tail) + at
        rest = tail[at:]
        first = tail[:at].rstrip().endswith(b"[")  # the trace had no events yet
        f.seek(pos)
        f.write((("\n" if first else ",\n") + ",\n".join(lines)).encode())
        f.write(rest)
        f.truncate()
    return len(lines)
