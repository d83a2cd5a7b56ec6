"""One per-rank trace file, of either format, read batch by batch (docs/run-format.md).

Format 2 (what the harness writes): an Arrow IPC stream, one record batch per step. A stream cut
short by a crash reads back every complete batch; the torn last one raises in the reader, is
dropped and said so. A stream whose writer never closed it simply ends. Format 1 (runs written
before): CSV, parsed whole (pyarrow's multi-threaded reader for files as the writers wrote them,
pandas and a careful row-by-row path for anything damaged) and then handed out in slices.

`TraceFile(path, kind, warnings)` opens either; `.batches(start)` yields pyarrow RecordBatches
with the format's columns (runformat.TRACE_COLS): integers as written (int32 or int64), text
dictionary-encoded, empty cells null. `start` resumes at a batch the index pass saw
(`positions`): a format 2 stream is re-entered at that byte, its dictionaries replayed first.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc

from harness.runformat import FORMATS, HEADER_KEY, TRACE_COLS, parse_header

_INT = "int64"
# dtypes of format 1's columns as written; t columns stay integer nanoseconds until aligned
# (float64 loses ns past 2^53); every column not named here is an integer
_TEXT, _NULLABLE = {"kind", "pair", "source", "module", "shape", "dtype"}, {"tb", "t_free"}
DTYPES = {kind: {c: str if c in _TEXT else "Int64" if c in _NULLABLE else _INT for c in cols}
          for kind, cols in TRACE_COLS.items()}
# the same as pyarrow types: text dictionary-encoded (-> pandas categoricals)
ARROW = {kind: {c: pa.dictionary(pa.int32(), pa.string()) if t is str else pa.int64()
                for c, t in cols.items()} for kind, cols in DTYPES.items()}
# pandas.read_csv's default NA strings (pandas._libs.parsers.STR_NA_VALUES; a test checks them):
# the fast path reads the same cells as empty as the pandas path does
_NA_VALUES = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
              "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null")
CSV_SLICE = 1 << 16   # rows per batch handed out from a format 1 file


class RunFormatError(ValueError):
    """The path is not a run directory, or one of its files is in an unknown format."""


def sniff(path: Path) -> int | None:
    """The format of a trace file from its first bytes: 1 (a '# harness-trace' line), 2 (an
    Arrow stream), None (empty)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return None
    if head.startswith(b"#"):
        return 1
    if head[:4] == b"\xff\xff\xff\xff" or head[:4] != b"\x00\x00\x00\x00":
        return 2
    return None   # an end-of-stream marker alone: nothing was written


class TraceFile:
    """A per-rank trace file: its format, and its record batches in order."""

    def __init__(self, path: Path, kind: str, warnings: list):
        self.path, self.kind, self.warnings = Path(path), kind, warnings
        self.torn = False
        self.fmt = sniff(self.path)
        self.table = None
        self.header = b""        # format 2: the bytes of the schema message
        self.dict_at = []        # format 2: (start, end, batches in it) of stream pieces
        #                          that carry a dictionary, in order
        if self.fmt == 1:
            self.table = read_csv_table(self.path, kind, warnings)
            if self.table is None:
                self.fmt = None
        elif self.fmt == 2:
            self._check_header()

    def _check_header(self):
        try:
            with open(self.path, "rb") as f:
                r = ipc.open_stream(f)
                self.header = _bytes_of(f, 0, f.tell())
                schema = r.schema
        except (pa.ArrowInvalid, OSError) as e:
            raise RunFormatError(f"{self.path}: not an Arrow stream with a trace schema ({e})")
        meta = schema.metadata or {}
        fields = parse_header("# harness-trace " + meta.get(HEADER_KEY.encode(), b"").decode())
        if fields is None:
            raise RunFormatError(f"{self.path}: Arrow stream without a '{HEADER_KEY}' header")
        _known(self.path, fields, self.kind)
        if tuple(schema.names) != TRACE_COLS[self.kind]:
            raise RunFormatError(f"{self.path}: columns {schema.names}, expected "
                                 f"{list(TRACE_COLS[self.kind])}")

    def batches(self, start: int = 0, positions=None):
        """Record batches from batch `start` on (format 2: `positions[start - 1]` is the byte
        where it begins, from a pass that ran from 0 with `scan=True`)."""
        if self.fmt == 1:
            for b in self.table.to_batches(CSV_SLICE)[start:] if start else \
                    self.table.to_batches(CSV_SLICE):
                yield b
            return
        if self.fmt != 2:
            return
        # a native file: pyarrow reads it without a Python call per read, and it does not
        # read ahead, so its position is where the last message read ends
        with pa.OSFile(str(self.path)) as f:
            reader = ipc.open_stream(f)
            if start:
                # the dictionaries first (the pieces that carry them, read as they were
                # written), then on from the batch's byte
                at = int(positions[start - 1])
                upto = max((e for s, e, n in self.dict_at if e <= at), default=0)
                while f.tell() < upto:
                    reader.read_next_batch()
                f.seek(at)
            while True:
                try:
                    b = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowInvalid, OSError, EOFError) as e:   # a torn last batch
                    self._torn(e)
                    return
                yield b

    def scan(self):
        """All batches from the start, each with the byte where the next begins (format 2;
        None for format 1): (batch, position). Records which pieces carry dictionaries."""
        if self.fmt == 1:
            for b in self.table.to_batches(CSV_SLICE):
                yield b, None
            return
        if self.fmt != 2:
            return
        self.dict_at = []
        with pa.OSFile(str(self.path)) as f:
            reader = ipc.open_stream(f)
            pos, dicts = f.tell(), 0
            while True:
                try:
                    b = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowInvalid, OSError, EOFError) as e:
                    self._torn(e)
                    return
                end = f.tell()
                st = reader.stats
                d = st.num_dictionary_batches + st.num_dictionary_deltas
                if d != dicts:
                    self.dict_at.append((pos, end, 1))
                    dicts = d
                pos = end
                yield b, end


    def _torn(self, e):
        if not self.torn:   # said once, however often the file is read
            self.torn = True
            self.warnings.append(f"{self.path}: dropped a truncated last batch ({e})")


def _bytes_of(f, start: int, end: int) -> bytes:
    at = f.tell()
    f.seek(start)
    data = f.read(end - start)
    f.seek(at)
    return data


def _known(path: Path, fields: dict, kind: str) -> None:
    if fields.get("format") not in {str(v) for v in FORMATS}:
        raise RunFormatError(f"{path}: unknown trace format version {fields.get('format')!r} "
                             f"(this reader knows format={','.join(map(str, FORMATS))})")
    if fields.get("kind", kind) != kind:
        raise RunFormatError(f"{path}: header says kind={fields['kind']}, expected kind={kind}")


def read_table(path: Path, kind: str, warnings: list) -> pa.Table | None:
    """A whole trace file of either format as one pyarrow table (format 1's types: int64,
    dictionary text), or None if absent or empty."""
    path = Path(path)
    if not path.exists():
        return None
    tf = TraceFile(path, kind, warnings)
    if tf.fmt == 1:
        return tf.table
    if tf.fmt is None:
        warnings.append(f"{path}: empty file (the rank wrote nothing)")
        return None
    batches = list(tf.batches())
    if not batches:
        return pa.table({c: pa.array([], t) for c, t in ARROW[kind].items()})
    return pa.Table.from_batches(batches).cast(pa.schema(ARROW[kind]))


def read_trace(path: Path, kind: str, warnings: list) -> pd.DataFrame | None:
    """One per-rank trace file -> raw frame (local ns; text as categoricals), or None if
    absent/empty."""
    table = read_table(path, kind, warnings)
    if table is None:
        return None
    return pd.DataFrame({c: (pd.arrays.IntegerArray(*nullable(table.column(c))) if t == "Int64"
                             else table.column(c).to_pandas())
                         for c, t in DTYPES[kind].items()}, copy=False)


def nullable(col) -> tuple:
    """An integer column that may be empty -> (int64 values with 0 where empty, empty mask)."""
    return (col.fill_null(0).to_numpy().astype(np.int64, copy=False),
            col.is_null().to_numpy(zero_copy_only=False))


# -- format 1: CSV ------------------------------------------------------------------------------

def read_csv_table(path: Path, kind: str, warnings: list) -> pa.Table | None:
    """A format 1 trace file -> pyarrow table with the format's columns, or None if empty."""
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
    if fields.get("format") != "1":
        _known(path, fields, kind)
        raise RunFormatError(f"{path}: a CSV trace file says format={fields.get('format')}; "
                             f"only format 1 is CSV")
    _known(path, fields, kind)
    data = path.read_bytes()
    if truncated:  # a crash mid-write leaves one partial last line: drop it (run-format.md)
        data = data[:data.rfind(b"\n") + 1]
        warnings.append(f"{path}: dropped a truncated last line")
    table = _parse_arrow(data, kind)
    if table is None:   # anything but a clean file: pandas, and the careful path for damage
        df = parse_rows(data, path, DTYPES[kind], warnings)
        if df is None:
            return None
        table = pa.table({c: pa.array(df[c], type=t if t == pa.int64() else pa.string())
                          for c, t in ARROW[kind].items()}).cast(pa.schema(ARROW[kind]))
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
    types = ARROW[kind]
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
    if any(table.column(c).null_count for c, t in DTYPES[kind].items() if t == _INT):
        return None           # a required integer is empty: the careful path drops the row
    return table


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
