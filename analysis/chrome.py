"""Export a run as a Chrome trace (JSON object format), for ui.perfetto.dev and chrome://tracing.

One process per rank (pid = rank), one thread per lane (tid: compute, send, recv, copy, step),
`ph:"X"` slices with ts/dur in µs since the run's start (rounded to the ns the trace was taken
in), flow arrows from each send slice (`ph:"s"`) to its receive slice (`ph:"f"`, `"bp":"e"`,
same id), and counter tracks (`ph:"C"`): activation bytes held (from pebbles) and each memory
sample source. Format: Google's "Trace Event Format" document, as summarised in FIELD.md.

Rendered as bytes with numpy, not through json.dump or per-event string formatting (a million
events must export in well under a second). The trace events come in sections (critical-path
slices, slices, flow starts, flow ends, counters), each a row layout: literal pieces that depend
only on a row's group — its distinct combination of name, kind, rank, lane, mb, layer, bytes...,
serialised once per group with json.dumps — and between them fields that vary per row (times,
step, id, bytes, pair). Every field sits at the same byte column in every row of a section: the
pieces are padded with spaces to their longest and numbers are right-aligned in a fixed width
(JSON allows whitespace between tokens, so `"ts":   1234.567` parses like `"ts":1234.567`). A
row is then whole 8-byte words: its group's piece words (one gather of a per-group table) with
each field's characters XOR-ed in, a 3-digit group at a time from lookup tables (the pieces
hold spaces, 0x20, where the fields go, and a character c is stored as c ^ 0x20, so that a blank
is 0). Rows whose groups end early (slices without a pair or wait split) lose their trailing
words in one boolean compaction, so the file keeps the events' order; keys keep theirs, but for
a step slice's name ('step 4'), a field at the end of its row. The file is ~5% larger than
compact JSON; text files are written through their byte buffer. tests/test_analysis_chrome.py
checks the events against a dict-per-event construction (json.loads equality) and the renderer
against json.loads on numbers and strings of every kind.
"""
from __future__ import annotations

import codecs
import io
import json
from typing import Iterator

import numpy as np
import pandas as pd

from analysis.measure.live import live_bytes
from analysis.measure.waits import _lookup, recv_split

TID = {"compute": 0, "send": 1, "recv": 2, "copy": 3, "step": 4, "other": 5, "critical": 6,
       "recompute": 7}
US = 1e6  # seconds -> microseconds
CHUNK = 8192  # rows built and written at a time: their words stay in the CPU's cache


def _name(kind, layer, mb, peer):
    """'fwd L3 mb0', 'send mb0 ->1', 'recv mb0 <-0', 'opt' (step slices: 'step 4', _slices)."""
    s = kind + (f" L{layer}" if layer >= 0 else "") + (f" mb{mb}" if mb >= 0 else "")
    return s + (f" ->{peer}" if kind == "send" else f" <-{peer}" if kind == "recv" else "")


def _codes(c) -> tuple[np.ndarray, int, int]:
    """A column's distinct values as codes: (a, shift, k), a + shift in 1..k-1 (NA: 0). A
    categorical's codes, an integer column itself when its range is small, else factorized."""
    if isinstance(c, pd.Series) and isinstance(c.dtype, pd.CategoricalDtype):
        return c.cat.codes.to_numpy(), 1, len(c.cat.categories) + 1
    dtype = getattr(c, "dtype", None)
    if isinstance(dtype, np.dtype) and dtype.kind in "iu" and len(c):
        a = np.asarray(c)
        lo, hi = int(a.min()), int(a.max())
        if hi - lo < 1 << 16:
            return a, 1 - lo, hi - lo + 2
    codes, uniq = pd.factorize(c)
    return codes, 1, len(uniq) + 1


def _groups(cols: list) -> tuple[np.ndarray, np.ndarray]:
    """Rows' value tuples over `cols` -> (group code per row, first row of each group); codes
    number the groups in order of first appearance. One integer key per row (mixed radix over
    each column's codes), compressed whenever it would overflow; keys of a small range are
    numbered through a table indexed by key, others factorized (hashed)."""
    n = len(cols[0])
    key, shift, radix = np.zeros(n, np.int64), 0, 1     # the key is key + shift
    for c in cols:
        a, s, k = _codes(c)
        if radix * k >= 2**62:
            key, u = pd.factorize(key)
            shift, radix = 0, len(u)
        key *= k                                        # in place: no 8-byte-per-row copies
        np.add(key, a, out=key, casting="unsafe")
        shift, radix = shift * k + s, radix * k
    key += shift
    if radix <= 2 * n + 1024:
        pos = np.full(radix, n, np.int64)
        pos[key[::-1]] = np.arange(n - 1, -1, -1)      # each key's first row: written last
        present = np.flatnonzero(pos < n)
        keys = present[np.argsort(pos[present], kind="stable")]
        code = np.empty(radix, np.int64)
        code[keys] = np.arange(len(keys))
        return code[key], pos[keys]
    g, u = pd.factorize(key)
    first = np.empty(len(u), np.int64)
    first[g[::-1]] = np.arange(n)[::-1]
    return g, first


# --- rows as 8-byte words ------------------------------------------------------------------
# A row's bytes start as spaces (0x20) wherever a field goes; a field's character c is XOR-ed
# in as c ^ 0x20 (so a blank contributes 0). Tokens are packed little-endian: first char lowest.

def _pack(s: str) -> int:
    return int.from_bytes(bytes(ord(c) ^ 0x20 for c in s), "little")


# a number's 3-digit groups, [0] for the units' group, [1] for those above: [0, 1000)
# zero-padded (below the number's leading group), [1000, 2000) leading zeros blank (its leading
# group; 1000 + 0: "  0" for the units, blank above them, where the number has no digits)
_DIG3 = np.array([[_pack(f"{i:03d}") for i in range(1000)]
                  + [_pack(f"{i:3d}" if i or not up else "") for i in range(1000)]
                  for up in (0, 1)], np.uint64)
_FRAC = np.array([_pack(f".{i:03d}") for i in range(1000)], np.uint64)  # µs' 3 decimals
_MINUS = np.uint64(_pack("-"))
_POW10 = 10 ** np.arange(19, dtype=np.int64)


def _put(F, p: int, v: np.ndarray, c: int) -> None:
    """XOR the c-character tokens v (one per row, c <= 8) into bytes p..p+c-1 of a field's
    words F (F[w]: each row's word w, contiguous). Bytes before 0 are left out: blank."""
    if p < 0:
        v, c, p = v >> np.uint64(-8 * p), c + p, 0
    w, s = divmod(p, 8)
    if not s:
        F[w] ^= v
        return
    F[w] ^= v << np.uint64(8 * s)
    if s + c > 8:                                       # spills into the next word
        F[w + 1] ^= v >> np.uint64(64 - 8 * s)


def _number(F, q: np.ndarray, end: int, nd: int, neg) -> None:
    """Non-negative integers q (< 10**nd) right-aligned to end before byte `end`, leading
    zeros blank; a '-' just before the digits of the rows where `neg` (bool array or None)."""
    q0, lo, hi = q, int(q.min()), int(q.max())
    for j in range((nd + 2) // 3):
        if j and hi < 1000 ** j:            # above every row's leading group: all blank
            break
        q1 = q // 1000
        idx = q - q1 * 1000
        if lo < 1000 ** (j + 1):            # some rows' leading group: their zeros blank
            idx += 1000 * (q1 == 0)
        _put(F, end - 3 * j - 3, _DIG3[min(j, 1)].take(idx), 3)
        q = q1
    if neg is not None and neg.any():
        i = np.flatnonzero(neg)
        at = end - 1 - np.maximum(1, np.searchsorted(_POW10, q0[i], "right"))
        F[at >> 3, i] ^= _MINUS << (8 * (at & 7)).astype(np.uint64)


class _Int:
    """An integer field, right-aligned."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.int64)

    def fit(self, sel) -> None:
        v = self.values if sel is None else self.values[sel]
        lo, hi = (int(v.min()), int(v.max())) if len(v) else (0, 0)
        self.nd, self.neg = len(str(max(-lo, hi))), lo < 0
        self.chars = self.nd + self.neg

    def put(self, F, v, p) -> None:
        _number(F, np.abs(v), p + self.chars, self.nd, v < 0 if self.neg else None)


class _Us:
    """A time in seconds, written in µs with 3 decimals: the value of %.3f of
    np.round(x * US, 3), right-aligned."""

    def __init__(self, seconds):
        self.values = np.asarray(seconds, dtype=float)

    @staticmethod
    def _k(x):  # thousandths of a µs, as np.round(x * US, 3) rounds them
        return np.rint(x * US * 1000.0)

    def fit(self, sel) -> None:
        x = self.values if sel is None else self.values[sel]
        lo, hi = (x.min(), x.max()) if len(x) else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("analysis.chrome: a time to export is NaN or infinite")
        klo, khi = int(self._k(lo)), int(self._k(hi))
        self.nd, self.neg = len(str(max(-klo, khi) // 1000)), klo < 0
        self.chars = self.nd + self.neg + 4

    def put(self, F, x, p) -> None:
        k = self._k(x).astype(np.int64)
        ak = np.abs(k) if self.neg else k
        q = ak // 1000
        end = p + self.chars - 4
        _put(F, end, _FRAC.take(ak - q * 1000), 4)
        _number(F, q, end, self.nd, k < 0 if self.neg else None)


class _Fix(_Us):
    """A number written with 3 decimals (a counter's value: ms, %), right-aligned."""

    @staticmethod
    def _k(x):
        return np.rint(np.asarray(x, float) * 1000.0)


class _Str:
    """A string field: per row a code into `strings` (-1: rows that do not have the field),
    the string's JSON literal left-aligned, blank after."""

    def __init__(self, codes, strings):
        self.values = np.asarray(codes, dtype=np.int64)
        s = list(map(str, pd.Index(strings).tolist()))
        raw = "".join(s)
        q = raw.isascii() and raw.isprintable() and '"' not in raw and "\\" not in raw
        if not q:                                       # escapes needed: json.dumps' quoting
            s = [json.dumps(x) for x in s]
        L = max(1, max(map(len, s), default=0))
        u = np.array(s, dtype=f"S{L}").view(np.uint8).reshape(len(s), L)    # NUL after
        self.width = L + 2 * q
        t = np.zeros((len(s), -(-self.width // 8) * 8), np.uint8)
        t[:, q:L + q] = np.where(u != 0, u ^ 0x20, 0)
        if q:                                           # the quotes around
            t[:, 0] = ord('"') ^ 0x20
            t[np.arange(len(s)), (u != 0).sum(1) + 1] = ord('"') ^ 0x20
        self.table = t.view(np.uint64)

    def fit(self, sel) -> None:
        self.chars = self.width

    def put(self, F, codes, p) -> None:
        t = self.table.take(codes, axis=0)
        for q in range(t.shape[1]):
            _put(F, p + 8 * q, t[:, q], min(8, self.chars - 8 * q))


def _section(g, pieces: list, fields: list, has=None) -> Iterator[tuple[np.ndarray, int]]:
    """Rows of one kind of trace event, CHUNK at a time: (their bytes as uint64 words, how many
    rows); each row is ",\\n" + the event + spaces to a whole word.

    g: each row's group, 0..G-1. fields: k of _Int, _Us, _Str (`values`: one per row; `fit`
    sets the width, `chars`, from the rows that have the field; `put` writes the characters).
    pieces: k + 1 entries, around the fields: a str, or one str per group (JSON text, ASCII).
    has: (groups, k) bool, the fields each group's rows have (default all): a group ends with
    the piece after its last field, and its pieces after a field it lacks are ''. Each piece is
    padded to its longest, so that every field has its column; where a group lacks one, its row
    has blanks."""
    n = len(g)
    if not n:
        return
    G, k = int(g.max()) + 1, len(fields)
    pieces = [[p] * G if isinstance(p, str) else p for p in pieces]
    has = np.ones((G, k), bool) if has is None else np.asarray(has, bool)
    every = has.all(0).tolist()
    for i, f in enumerate(fields):
        f.fit(None if every[i] else np.flatnonzero(has[:, i].take(g)))
    off, pos = [], 2                                    # each field's first byte in the row
    for i, f in enumerate(fields):
        pos += max(map(len, pieces[i]))
        off.append(pos)
        pos += f.chars
    rows = []                                           # each group's row: pieces, blanks
    for j, last in enumerate((k - 1 - np.argmax(has[:, ::-1], axis=1)).tolist()):
        row = bytearray(b",\n" + pieces[0][j].encode())
        for i in range(last + 1 if has[j].any() else 0):
            row += b" " * (off[i] + fields[i].chars - len(row)) + pieces[i + 1][j].encode()
        rows.append(row)
    words = np.array([-(-len(r) // 8) for r in rows])
    W = int(words.max())
    base = np.array([bytes(r.ljust(8 * W)) for r in rows], dtype=f"S{8 * W}")
    base = base.view(np.uint64).reshape(G, W)
    keep = None if (words == W).all() else np.arange(W) < words[:, None]
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        gc = g[a:b]
        M = base.take(gc, axis=0)
        for i, f in enumerate(fields):
            v = f.values[a:b]
            r = None if every[i] else np.flatnonzero(has[:, i].take(gc))
            if r is not None:
                if not len(r):
                    continue
                v = v[r]
            # the field's characters go into words of their own (contiguous: fast), which are
            # then XOR-ed into the rows' words (strided) once each
            w0, p = divmod(off[i], 8)
            F = np.zeros(((p + f.chars + 7) // 8, len(v)), np.uint64)
            f.put(F, v, p)
            for q, col in enumerate(F, w0):
                if r is None:
                    M[:, q] ^= col
                else:
                    M[r, q] ^= col
        yield (M.ravel() if keep is None else M[keep.take(gc, axis=0)]), b - a


def _slices(ev, rs) -> Iterator[tuple[np.ndarray, int]]:
    """The events as X slices, in their order (see _section)."""
    n = len(ev)
    if not n:
        return
    kind = ev["kind"]
    pair = ev["pair"]
    paired = pair.notna().to_numpy()
    isr = (kind == "recv").to_numpy()
    split = rs.drop_duplicates("pair")
    split = split[split["pair"].notna()]
    j = _lookup(split["pair"], pair)
    w = np.full(n, np.nan)
    x = np.full(n, np.nan)
    hit = j >= 0
    w[hit] = split["wait"].to_numpy(float)[j[hit]]
    x[hit] = split["transfer"].to_numpy(float)[j[hit]]
    # 0: no pair; 1: pair; 2: a receive with its wait split
    cls = np.where(paired, np.where(isr & ~np.isnan(w), 2, 1), 0)
    stepcol = ev["step"].to_numpy()
    # a step slice's name, 'step 4', is a field of its own at the end of its row (the groups
    # would otherwise be one per step)
    isstep = (kind == "step").to_numpy()
    steps, at = np.unique(stepcol[isstep], return_inverse=True)
    named = np.full(n, -1)
    named[isstep] = at
    lane = ev["lane"]
    tid = np.array([TID.get(x_, 5) for x_ in lane.to_numpy(dtype=object)]) \
        if not isinstance(lane.dtype, pd.CategoricalDtype) else np.array(
            [TID.get(c, 5) for c in lane.cat.categories] + [5])[lane.cat.codes.to_numpy()]
    cols = {c: ev[c].to_numpy() for c in ("rank", "mb", "layer", "peer", "bytes")}
    g, first = _groups([kind, cols["layer"], cols["mb"], cols["peer"], cols["rank"], tid,
                        cols["bytes"], cls])
    pieces = [[] for _ in range(8)]
    for k, layer, mb, peer, r, t, b, cl in zip(
            kind.take(first).tolist(), *(a[first].tolist() for a in (
                cols["layer"], cols["mb"], cols["peer"], cols["rank"], tid, cols["bytes"],
                cls))):
        name = "" if k == "step" else '"name":%s,' % json.dumps(_name(k, layer, mb, peer))
        close = '},"name":' if k == "step" else "}}"
        tail = [[close, "", "", ""], [',"pair":', close, "", ""],
                [',"pair":', ',"wait_us":', ',"transfer_us":', close]][cl]
        for piece, text in zip(pieces, [
                '{%s"cat":%s,"ph":"X","ts":' % (name, json.dumps(k)), ',"dur":',
                ',"pid":%d,"tid":%d,"args":{"step":' % (r, t),
                ',"mb":%d,"layer":%d,"bytes":%d%s' % (mb, layer, b, tail[0]),
                *tail[1:], "}" if k == "step" else ""]):
            piece.append(text)
    c, step = cls[first], kind.take(first).to_numpy() == "step"
    if isinstance(pair.dtype, pd.CategoricalDtype):
        codes, values = pair.cat.codes.to_numpy(), pair.cat.categories
    else:
        codes, values = pd.factorize(pair)
    start, end = ev["start"].to_numpy(float), ev["end"].to_numpy(float)
    yield from _section(
        g, pieces,
        [_Us(start), _Us(end - start), _Int(stepcol), _Str(codes, values), _Us(w), _Us(x),
         _Str(named, [f"step {s}" for s in steps.tolist()])],
        has=np.column_stack([np.ones((len(first), 3), bool), c >= 1, c == 2, c == 2, step]))


def _byte_writer(f):
    """f.write for bytes: binary files directly; text files through their binary buffer when
    their encoding leaves ASCII as it is (the trace is ASCII: json.dumps escapes the rest),
    else (io.StringIO) decoded."""
    if not isinstance(f, io.TextIOBase):
        return f.write
    raw = getattr(f, "buffer", None)
    if raw is not None and codecs.lookup(f.encoding).name in (
            "utf-8", "ascii", "iso8859-1", "cp1252"):
        f.flush()
        return raw.write
    return lambda b: f.write(bytes(b).decode("ascii"))


def _lines(texts: list):
    return "".join(",\n" + s for s in texts).encode(), len(texts)


def _counters(ts, ranks_, values, name: str, source=None, arg: str = "bytes", pids=None):
    """ph:"C" rows: name (+ " " + source, per row), time, rank (the process), one value."""
    ranks_ = np.asarray(ranks_, dtype=np.int64)
    g, first = _groups([ranks_] if source is None else [source, ranks_])
    names = [name] * len(first) if source is None else [
        f"{name} {s}" for s in source.take(first).tolist()]
    num = _Int(values) if np.asarray(values).dtype.kind in "iu" else _Fix(values)
    return _section(g, [['{"name":%s,"ph":"C","ts":' % json.dumps(s) for s in names],
                        [',"pid":%d,"tid":0,"args":{%s:' % (r, json.dumps(arg))
                         for r in ranks_[first]], "}}"], [_Us(ts), num])


def _flows(ph, ts, ranks_, tid, base: int = 0):
    """Flow events: name p2p, the given phase, id base+1.., time, rank, lane."""
    ranks_ = np.asarray(ranks_, dtype=np.int64)
    g, first = _groups([ranks_])
    return _section(g, ['{"name":"p2p","cat":"flow","ph":%s,"id":' % ph, ',"ts":',
                        [',"pid":%d,"tid":%d}' % (r, tid) for r in ranks_[first]]],
                    [_Int(np.arange(base + 1, base + len(ts) + 1)), _Us(ts)])


def fragment(events, pebbles, memory, critical=None, flow_base: int = 0, t_from=None,
             t_to=None, start_level: bool = False):
    """The trace events of a run or of a piece of it (a chunk or a window of steps): slices,
    the critical path's slices, flows (ids flow_base+1, ...), counters of activation bytes held
    and of memory samples. -> chunks of (bytes: each event ",\n" + its JSON, how many).

    t_from, t_to: the piece's time range, [t_from, t_to): its pebbles include those still held
    at t_from (so the bytes held come out right), and the counters are those of the range;
    start_level: the activation counter starts at t_from with the level held then (a window
    in the middle of a run)."""
    rs = recv_split(events)
    m = rs[rs["matched"]]
    lb = live_bytes(pebbles)
    lo = -np.inf if t_from is None else t_from
    hi = np.inf if t_to is None else t_to
    if len(lb):
        t = lb["time"].to_numpy()
        before = t < lo
        held = lb[before].groupby("rank").tail(1).assign(time=lo) if start_level and \
            before.any() else lb.iloc[:0]
        lb = pd.concat([held, lb[~before & (t < hi)]]).sort_values(["rank", "time"],
                                                                   kind="stable")
    if t_from is not None or t_to is not None:
        mt = memory["time"].to_numpy()
        memory = memory[(mt >= lo) & (mt < hi)]
    if critical is not None and len(critical):
        c = critical
        rank = c["rank"].to_numpy(np.int64)
        g, first = _groups([c["what"], rank, c["kind"]])
        yield from _section(
            g, [['{"name":%s,"cat":"critical","ph":"X","ts":' % json.dumps(
                "critical: " + str(w)) for w in c["what"].take(first).tolist()], ',"dur":',
                [',"pid":%d,"tid":6,"args":{"step":' % r for r in rank[first].tolist()],
                [',"kind":%s}}' % json.dumps(str(k)) for k in c["kind"].take(first).tolist()]],
            [_Us(c["start"].to_numpy(float)), _Us((c["end"] - c["start"]).to_numpy(float)),
             _Int(c["step"].to_numpy())])
    yield from _slices(events, rs)
    # flow start on the send slice at its start, end bound to the enclosing receive slice
    yield from _flows('"s"', m["send_start"].to_numpy(float), m["send_rank"], TID["send"],
                      flow_base)
    yield from _flows('"f","bp":"e"', m["start"].to_numpy(float), m["rank"], TID["recv"],
                      flow_base)
    yield from _counters(lb["time"].to_numpy(float), lb["rank"], lb["bytes"].to_numpy(np.int64),
                         "activations (pebbles)")
    yield from _counters(memory["time"].to_numpy(float), memory["rank"],
                         memory["bytes"].to_numpy(np.int64), "memory", memory["source"])


def metadata(ranks, lanes: list, names: dict | None = None) -> list:
    """Process and thread names: a process per rank (and per pid in `names`: processes that
    are not ranks, such as the run's per-step tracks), a thread per (rank, lane) of `lanes`
    (in order of first appearance)."""
    md = []
    for pid, name in [(int(r), f"rank {r}") for r in ranks] + list((names or {}).items()):
        md.append({"ph": "M", "name": "process_name", "pid": int(pid), "tid": 0,
                   "args": {"name": name}})
        md.append({"ph": "M", "name": "process_sort_index", "pid": int(pid), "tid": 0,
                   "args": {"sort_index": int(pid)}})
    for r, lane in lanes:
        md.append({"ph": "M", "name": "thread_name", "pid": int(r), "tid": TID.get(lane, 5),
                   "args": {"name": lane}})
        md.append({"ph": "M", "name": "thread_sort_index", "pid": int(r),
                   "tid": TID.get(lane, 5), "args": {"sort_index": TID.get(lane, 5)}})
    return [json.dumps(x) for x in md]


def critical_names(ranks) -> list:
    """The "critical path" thread of each rank the path passes through."""
    return [json.dumps({"ph": "M", "name": "thread_name", "pid": int(r), "tid": TID["critical"],
                        "args": {"name": "critical path"}}) for r in sorted(ranks)]


def lanes_of(events) -> list:
    """(rank, lane) pairs of the events, in order of first appearance."""
    _, first = _groups([events["rank"], events["lane"]])
    return list(zip(events["rank"].to_numpy()[first].tolist(),
                    events["lane"].take(first).tolist()))


def other_data(meta: dict | None, **more) -> dict:
    other = {"source": "harness analysis (python -m analysis.pebble)",
             "time": "µs since the run's first event, rank 0's clock"}
    if meta:
        other.update({k: meta.get(k) for k in ("experiment", "start_time", "world_size",
                                                "schedule")})
    return other | more


def assemble(f, parts, other: dict) -> int:
    """Write a trace: `parts` an iterable of (bytes, count) chunks (each event ",\n" + its
    JSON: _lines, fragment), inside {"traceEvents": [...], ...}; -> the number of events."""
    write = _byte_writer(f)
    write(b'{"traceEvents":[')
    n = 0
    for part, k in parts:                # each event: ",\n" + its JSON
        if not k:
            continue
        if not n:                        # the first: no comma before it
            part = bytearray(part) if isinstance(part, bytes) else part.view(np.uint8)
            part[0] = ord(" ")
        write(part)
        n += k
    write(('\n],"displayTimeUnit":"ms","otherData":' + json.dumps(other) + "}\n").encode())
    return n


def write_chrome(f, events, pebbles, memory, meta: dict | None = None,
                 critical=None) -> int:
    """Write the whole run as a trace to the open file `f` (text or binary); returns the
    number of trace events.

    critical: analysis.measure.critical.critical_path segments, shown as a "critical path" track
    (tid 6) in each rank the path passes through: one slice per segment, named by what ran.

    Streams in chunks of CHUNK events, so a million-event run never holds all its text."""
    ranks = sorted(set().union(*(pd.unique(d["rank"].to_numpy()).tolist()
                                 for d in (events, pebbles, memory))))

    def parts():
        yield _lines(metadata(ranks, lanes_of(events)))
        if critical is not None and len(critical):
            yield _lines(critical_names(critical["rank"].unique()))
        yield from fragment(events, pebbles, memory, critical)
    return assemble(f, parts(), other_data(meta))


def chrome_json(events, pebbles, memory, meta: dict | None = None, critical=None) -> str:
    """The whole trace as one JSON string: {"traceEvents": [...], "displayTimeUnit", ...}."""
    buf = io.StringIO()
    write_chrome(buf, events, pebbles, memory, meta, critical)
    return buf.getvalue()


_TAIL = b'\n],"displayTimeUnit"'


def append_events(path, lines: list) -> int:
    """Add trace events (JSON strings) to a trace.json written by `write_chrome`, in place:
    they go before its closing `]`, and the tail (displayTimeUnit, otherData) is kept.
    -> the number added. Used to merge Kineto's events (analysis.read.kineto)."""
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
