"""Per-rank, append-only trace files (format: docs/run-format.md) and the Tracer that fills them.

Spans are kept in a list during the step (a tuple append each) and written once per step, after
the step's CUDA events (if any) are resolved; the file is flushed then, so a crash keeps every
completed step. No two ranks write the same file.
"""
from __future__ import annotations

from pathlib import Path

from ..runformat import EVENT_COLS, FORMAT, MEMORY_COLS, PEBBLE_COLS, trace_file, trace_header

__all__ = ["EVENT_COLS", "FORMAT", "MEMORY_COLS", "PEBBLE_COLS", "Tracer", "NullTracer", "TraceFile"]


def _cell(v) -> str:
    return "" if v is None else str(v)


class TraceFile:
    def __init__(self, path: Path, kind: str, rank: int, cols: tuple):
        self.f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.f.write(trace_header(kind, rank) + "\n")
        self.f.write(",".join(cols) + "\n")
        self.f.flush()

    def write_rows(self, rows) -> None:
        if rows:
            self.f.write("".join(",".join(map(_cell, r)) + "\n" for r in rows))
        self.f.flush()

    def close(self):
        self.f.close()


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
