"""Per-rank, append-only trace files (format: docs/run-format.md) and the Tracer that fills them.

Spans are kept in a list during the step (a tuple append each) and written once per step, after
the step's CUDA events (if any) are resolved: one Arrow record batch per step, flushed, so a
crash keeps every completed step (a reader drops a torn last batch). No two ranks write the
same file.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from ..runformat import (EVENT_COLS, FORMAT, HEADER_KEY, MEMORY_COLS, PEBBLE_COLS, TRACE_TYPES,
                         trace_file, trace_header)

__all__ = ["EVENT_COLS", "FORMAT", "MEMORY_COLS", "PEBBLE_COLS", "Tracer", "NullTracer",
           "TraceFile", "arrow_schema"]

_TYPES = {"int32": pa.int32(), "int64": pa.int64(), "string": pa.string(),
          "dict": pa.dictionary(pa.int32(), pa.string())}


def arrow_schema(kind: str, rank: int) -> pa.Schema:
    """The Arrow schema of a format 2 trace file (runformat.TRACE_TYPES), its header in the
    schema's metadata."""
    return pa.schema([pa.field(c, _TYPES[t.rstrip("?")], nullable=t.endswith("?"))
                      for c, t in TRACE_TYPES[kind].items()],
                     metadata={HEADER_KEY: trace_header(kind, rank)[len("# harness-trace "):]})


class _Dictionary:
    """A text column's dictionary, grown as values appear and never reordered, so the stream
    writes each value once (a dictionary delta) however many batches use it."""

    def __init__(self):
        self.code: dict = {}
        self.values = pa.array([], pa.string())

    def encode(self, col) -> pa.DictionaryArray:
        code = self.code
        try:
            idx = list(map(code.__getitem__, col))
        except KeyError:       # a value not seen before: the dictionary grows (a delta)
            for v in dict.fromkeys(col):
                if v not in code:
                    code[v] = len(code)
            self.values = pa.array(list(code), pa.string())
            idx = list(map(code.__getitem__, col))
        return pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), self.values,
                                              safe=False)


class TraceFile:
    """One trace file: an Arrow IPC stream (format 2), a record batch per write_rows, flushed.

    A step's rows repeat the last step's but for the times and the step number (the same
    schedule runs every step): a column equal to the one written last reuses its Arrow array,
    so that writing costs the rank little more than the times (benchmarks/run_format.py)."""

    def __init__(self, path: Path, kind: str, rank: int, cols: tuple):
        self.schema = arrow_schema(kind, rank)
        assert tuple(self.schema.names) == tuple(cols), "runformat: columns and types disagree"
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.w = ipc.new_stream(self.f, self.schema,
                                options=ipc.IpcWriteOptions(emit_dictionary_deltas=True))
        self.f.flush()
        self.dicts = {f.name: _Dictionary() for f in self.schema
                      if pa.types.is_dictionary(f.type)}
        self.last = [(None, None)] * len(self.schema)   # per column: (values, their array)

    def write_rows(self, rows) -> None:
        """Rows as tuples in the columns' order; None (or "" in a text column) is empty."""
        if rows:
            arrays = []
            for i, (f, col) in enumerate(zip(self.schema, zip(*rows))):
                seen, arr = self.last[i]
                if col != seen:
                    if f.name in self.dicts:
                        arr = self.dicts[f.name].encode(col)
                    elif pa.types.is_string(f.type):
                        arr = pa.array([v or None for v in col], f.type)
                    else:
                        arr = pa.array(col, f.type)
                    self.last[i] = (col, arr)
                arrays.append(arr)
            self.w.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self.f.flush()

    def close(self):
        self.w.close()
        self.f.close()


def frame_batches(kind: str, rank: int, df, ends) -> tuple:
    """A frame with the columns of `kind` (local int ns; empty cells NaN/None/pd.NA) as format 2
    record batches, cut at row positions `ends` (each batch's end): vectorised, for writers of
    whole frames (harness.synthetic, benchmarks). Text columns share one dictionary, sorted.
    -> (schema, batches)."""
    # numpy and pandas for whole frames only: a rank's own writer does without them
    import numpy as np
    import pandas as pd
    schema = arrow_schema(kind, rank)
    cols = []
    for f in schema:
        v = df[f.name] if f.name in df else pd.Series([None] * len(df), dtype=object)
        if pa.types.is_dictionary(f.type) or pa.types.is_string(f.type):
            # empty text is missing too; only the present cells are compared (no str() each)
            txt = v.astype(object)
            obj, keep = txt.to_numpy(), v.notna().to_numpy().copy()
            keep[keep] = obj[keep] != ""
            cat = pd.Categorical(txt.where(keep, None))
            words = pa.array([str(x) for x in cat.categories], pa.string())
            codes = np.asarray(cat.codes, np.int32)
            if pa.types.is_dictionary(f.type):
                cols.append(("dict", codes, words))
            else:
                cols.append(("str", codes, words))
        else:
            num = pd.to_numeric(v, errors="coerce")
            na = num.isna().to_numpy()
            val = num.fillna(0).to_numpy().astype(np.int64)
            cols.append(("int", val, na if na.any() else None))
    out, start = [], 0
    for end in list(ends):
        if end <= start:
            continue
        arrays = []
        for f, (how, a, b) in zip(schema, cols):
            x = a[start:end]
            if how == "dict":
                arrays.append(pa.DictionaryArray.from_arrays(
                    pa.array(x, pa.int32(), mask=x < 0), b))
            elif how == "str":
                arrays.append(b.take(pa.array(x, pa.int32(), mask=x < 0)))
            else:
                arrays.append(pa.array(x, f.type, mask=None if b is None else b[start:end]))
        out.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
        start = end
    return schema, out


def write_frame(path: Path, kind: str, rank: int, df, ends) -> None:
    """Write a frame as a format 2 trace file (frame_batches), one record batch per segment."""
    schema, batches = frame_batches(kind, rank, df, ends)
    with open(path, "wb") as f, ipc.new_stream(
            f, schema, options=ipc.IpcWriteOptions(emit_dictionary_deltas=True)) as w:
        for b in batches:
            w.write_batch(b)


class Tracer:
    """Collects one rank's spans and pebbles and writes them once per step."""
    enabled = True

    def __init__(self, run_dir: Path, rank: int, timer, tracker):
        self.timer, self.tracker = timer, tracker
        self.mark = timer.mark
        files = {}
        for kind, cols in (("events", EVENT_COLS), ("pebbles", PEBBLE_COLS),
                           ("memory", MEMORY_COLS)):
            path = run_dir / trace_file(kind, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            files[kind] = TraceFile(path, kind, rank, cols)
        self.events, self.pebbles, self.memory = files["events"], files["pebbles"], files["memory"]
        self.spans: list = []   # (step, mb, layer, kind, mark0, mark1) — marks resolved at flush
        self.comms: list = []   # full event rows on the host clock

    def begin_step(self):
        self.timer.begin_step()

    def span(self, step, mb, layer, kind, m0, m1):
        self.spans.append((step, mb, layer, kind, m0, m1))

    def comm(self, step, mb, kind, t0, t1, tb, peer, tag, nbytes, pair):
        self.comms.append((step, mb, -1, kind, t0, t1, tb, peer, tag, nbytes, pair))

    def copy(self, step, mb, kind, t0, t1, nbytes):
        self.comms.append((step, mb, -1, kind, t0, t1, None, -1, -1, nbytes, ""))

    def flush(self) -> None:
        """Write the step's spans and the pebbles freed so far; call at the end of each step."""
        marks = [m for s in self.spans for m in (s[4], s[5])]
        times = self.timer.resolve(marks)
        rows = [(s[0], s[1], s[2], s[3], times[2 * i], times[2 * i + 1], None, -1, -1, 0, "")
                for i, s in enumerate(self.spans)]
        rows += self.comms
        rows.sort(key=lambda r: r[4])
        self.events.write_rows(rows)
        self.spans, self.comms = [], []
        self.tracker.resolve_marks(self.timer.resolve)
        self.pebbles.write_rows([p.row() for p in self.tracker.take_freed()])

    def close(self) -> None:
        """Flush, then record pebbles never freed (t_free empty) and close the files."""
        self.flush()
        self.pebbles.write_rows([p.row(t_free=None) for p in self.tracker.take_live()])
        for f in (self.events, self.pebbles, self.memory):
            f.close()


class NullTracer:
    """Tracing off (`trace.enabled=false`): the same calls, nothing recorded."""
    enabled = False

    @staticmethod
    def mark():
        return 0

    def begin_step(self):
        pass

    def span(self, *a):
        pass

    def comm(self, *a):
        pass

    def copy(self, *a):
        pass

    def flush(self):
        pass

    def close(self):
        pass
