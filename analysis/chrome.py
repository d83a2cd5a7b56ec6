"""Export a run as a Chrome trace (JSON object format), for ui.perfetto.dev and chrome://tracing.

One process per rank (pid = rank), one thread per lane (tid: compute, send, recv, copy, step),
`ph:"X"` slices with ts/dur in µs since the run's start (rounded to the ns the trace was taken
in), flow arrows from each send slice (`ph:"s"`) to its receive slice (`ph:"f"`, `"bp":"e"`,
same id), and counter tracks (`ph:"C"`): activation bytes held (from pebbles) and each memory
sample source. Format: Google's "Trace Event Format" document, as summarised in FIELD.md.

Rendered with one %-template per event kind over plain Python lists: building a dict per event
and serialising it costs ~4x more, and a million-event run must export in seconds. Every string
put in a template is one of ours (kind names, pair ids like `A3.0.0>1`), so needs no escaping.
"""
from __future__ import annotations

import io
import json

import numpy as np

from analysis.metrics import live_bytes, recv_split

TID = {"compute": 0, "send": 1, "recv": 2, "copy": 3, "step": 4, "other": 5, "critical": 6,
       "recompute": 7}
US = 1e6  # seconds -> microseconds
CHUNK = 100_000  # events formatted and written at a time

_X = ('{"name":"%s","cat":"%s","ph":"X","ts":%.3f,"dur":%.3f,"pid":%d,"tid":%d,'
      '"args":{"step":%d,"mb":%d,"layer":%d,"bytes":%d%s}}')
_P = ('{"name":"critical: %s","cat":"critical","ph":"X","ts":%.3f,"dur":%.3f,"pid":%d,'
      '"tid":6,"args":{"step":%d,"kind":"%s"}}')
_C = '{"name":"%s","ph":"C","ts":%.3f,"pid":%d,"tid":0,"args":{"bytes":%d}}'
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


def _slices(ev, rs) -> list:
    n = len(ev)
    extra = [""] * n
    pair = ev["pair"]
    has = np.flatnonzero(pair.notna().to_numpy())
    split = rs.drop_duplicates("pair").set_index("pair")
    wt = np.round(split.reindex(pair.iloc[has])[["wait", "transfer"]].to_numpy() * US, 3)
    recv = (ev["kind"].to_numpy()[has] == "recv")
    for i, p, (w, t), isr in zip(has, pair.iloc[has].tolist(), wt, recv):
        extra[i] = f',"pair":"{p}"' + (f',"wait_us":{w:.3f},"transfer_us":{t:.3f}'
                                       if isr and w == w else "")
    # names from the few distinct (kind, layer, mb, peer) keys, then one lookup per event
    key = ev[["kind", "layer", "mb", "peer"]].assign(
        s=np.where(ev["kind"].to_numpy() == "step", ev["step"].to_numpy(), 0))
    gb = key.groupby(list(key.columns), sort=False, dropna=False)
    # with sort=False both number groups by first appearance, so codes index the keys
    uniq = [_name(*k) for k in gb.size().index] if n else []
    names = np.array(uniq + [""], dtype=object)[gb.ngroup().to_numpy()].tolist()
    ts = np.round(ev["start"].to_numpy() * US, 3).tolist()
    dur = np.round((ev["end"] - ev["start"]).to_numpy() * US, 3).tolist()
    tid = ev["lane"].map(TID).fillna(5).astype(int).tolist()
    cols = [ev[c].tolist() for c in ("kind", "rank", "step", "mb", "layer", "bytes")]
    return [_X % (nm, k, t, d, r, ti, st, m, l, b, x) for nm, k, r, st, m, l, b, t, d, ti, x
            in zip(names, cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], ts, dur, tid,
                   extra)]


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
            yield [_P % (w, t, d, r, st, k) for w, t, d, r, st, k in
                   zip(c["what"].tolist(), np.round(c["start"].to_numpy() * US, 3).tolist(),
                       np.round((c["end"] - c["start"]).to_numpy() * US, 3).tolist(),
                       c["rank"].astype(int).tolist(), c["step"].astype(int).tolist(),
                       c["kind"].tolist())]
        for i in range(0, len(events), CHUNK):
            yield _slices(events.iloc[i:i + CHUNK], rs)
        # flow start on the send slice at its start, end bound to the enclosing receive slice
        yield [_S % (i, t, p, TID["send"]) for i, t, p in
               zip(ids, np.round(m["send_start"].to_numpy() * US, 3).tolist(),
                   m["send_rank"].astype(int).tolist())]
        yield [_F % (i, t, p, TID["recv"]) for i, t, p in
               zip(ids, np.round(m["start"].to_numpy() * US, 3).tolist(),
                   m["rank"].astype(int).tolist())]
        for i in range(0, len(lb), CHUNK):
            d = lb.iloc[i:i + CHUNK]
            yield [_C % ("activations (pebbles)", t, r, b) for t, r, b in
                   zip(np.round(d["time"].to_numpy() * US, 3).tolist(),
                       d["rank"].astype(int).tolist(), d["bytes"].astype(np.int64).tolist())]
        yield [_C % ("memory " + s, t, r, b) for s, t, r, b in
               zip(memory["source"].tolist(), np.round(memory["time"].to_numpy() * US, 3).tolist(),
                   memory["rank"].tolist(), memory["bytes"].tolist())]

    f.write('{"traceEvents":[')
    n = 0
    for part in chunks():
        if part:
            f.write((",\n" if n else "\n") + ",\n".join(part))
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
