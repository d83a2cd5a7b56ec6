"""CSV (format 1) or Arrow IPC (format 2) for the trace files? `python -m benchmarks.run_format
[--steps 300] [--repeat 5]`

The same rows both ways: a simulated 4-rank 1F1B step (harness/synthetic.py; 632 events, 288
pebbles, 28 memory samples per rank) repeated `--steps` times:

- writer: the cost on the rank's hot path of writing one step's rows, as the harness does at
  the end of every step (format 2: harness.trace.writer.TraceFile.write_rows, one record batch,
  flushed; format 1: the CSV writer the harness had, rows joined as text and flushed), in µs
  per step and rank (median of --repeat);
- disk: bytes per row of each kind;
- read: the analysis's reading of the whole run into frames (analysis.load_run), CPU seconds.

Prints one table. Rows are written from Python tuples, as the harness's tracer holds them.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from analysis import load_run
from harness import runformat as F
from harness.synthetic import MS, pipeline_frames, write_run
from harness.trace.writer import TraceFile


def _cell(v) -> str:
    return "" if v is None else str(v)


class CsvTraceFile:
    """The format 1 writer as the harness had it (harness/trace/writer.py before format 2)."""

    def __init__(self, path: Path, kind: str, rank: int, cols: tuple):
        self.f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.f.write(F.trace_header(kind, rank, 1) + "\n")
        self.f.write(",".join(cols) + "\n")
        self.f.flush()

    def write_rows(self, rows) -> None:
        if rows:
            self.f.write("".join(",".join(map(_cell, r)) + "\n" for r in rows))
        self.f.flush()

    def close(self):
        self.f.close()


def _rows(df, cols) -> list:
    """A frame's rows as the tracer's tuples: ints, str, None for empty."""
    out = []
    for r in df[list(cols)].itertuples(index=False):
        out.append(tuple(None if (isinstance(v, float) and v != v) else
                         (int(v) if isinstance(v, (float, np.integer)) and c not in ("kind",)
                          else v) for c, v in zip(cols, r)))
    return out


def writer_cost(tmp: Path, steps: int, repeat: int) -> dict:
    """µs per step and rank of writing its rows, per format and kind."""
    fr = pipeline_frames(p=4, m=8, schedule="1f1b", steps=1, layers_per_stage=8,
                         sample_ns=10 * MS)
    res = {}
    period = 10**9
    for kind, df in (("events", fr["events"]), ("pebbles", fr["pebbles"])):
        part = df[df["rank"] == 1]
        cols = F.TRACE_COLS[kind]
        base = _rows(part, cols)
        tcols = [i for i, c in enumerate(cols) if c in ("t0", "t1", "tb", "t_store", "t_free")]
        # every step its own times and step number, as in a run (the rest repeats)
        per_step = [[tuple(s if c == "step" else (v + s * period if i in tcols and v is not None
                                                   else v)
                           for i, (c, v) in enumerate(zip(cols, r))) for r in base]
                    for s in range(steps)]
        rows = base
        for fmt, cls in ((1, CsvTraceFile), (2, TraceFile)):
            times = []
            for _ in range(repeat):
                f = cls(tmp / f"w{fmt}{kind}", kind, 1, F.TRACE_COLS[kind])
                t = time.perf_counter()
                for s in range(steps):
                    f.write_rows(per_step[s])
                times.append((time.perf_counter() - t) / steps * 1e6)
                f.close()
            res[fmt, kind] = (statistics.median(times), len(rows))
    return res


def disk_and_read(tmp: Path, steps: int) -> dict:
    fr = pipeline_frames(p=4, m=8, schedule="1f1b", steps=steps, layers_per_stage=8,
                         sample_ns=10 * MS)
    out = {}
    for fmt in (1, 2):
        d = tmp / f"run{fmt}"
        write_run(d, fr["meta"], fr["events"], fr["pebbles"], fr["memory"], fr["stats"],
                  fr["schedule"], fmt=fmt)
        size = {kind: sum(p.stat().st_size for p in (d / "trace").glob(f"{kind}.*"))
                for kind in F.TRACE_COLS}
        t = time.process_time()
        run = load_run(d)
        cpu = time.process_time() - t
        rows = {"events": len(run.events), "pebbles": len(run.pebbles),
                "memory": len(run.memory)}
        out[fmt] = ({k: size[k] / rows[k] for k in size}, cpu, sum(rows.values()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="run-format-"))
    try:
        w = writer_cost(tmp, a.steps, a.repeat)
        dr = disk_and_read(tmp, a.steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"one simulated 1F1B step (4 ranks) x {a.steps}: {dr[1][2]:,} rows")
    print(f"{'':34}{'format 1 (CSV)':>18}{'format 2 (Arrow)':>18}")
    for kind in ("events", "pebbles"):
        n = w[1, kind][1]
        print(f"{f'writer, {kind} ({n} rows/step), µs':34}{w[1, kind][0]:18.0f}"
              f"{w[2, kind][0]:18.0f}")
    for kind in ("events", "pebbles", "memory"):
        print(f"{f'disk, {kind}, bytes per row':34}{dr[1][0][kind]:18.1f}{dr[2][0][kind]:18.1f}")
    print(f"{'read (load_run), CPU s':34}{dr[1][1]:18.2f}{dr[2][1]:18.2f}")


if __name__ == "__main__":
    main()
