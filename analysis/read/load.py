"""Read a run directory (docs/run-format.md, formats 1 and 2) into tidy pandas frames.

All times in the returned frames are float **seconds since the run's start**, on rank 0's clock:
each rank's local nanoseconds get that rank's clock offset (meta.clock.estimates, linear
interpolation between the "start" and "end" estimates, Score-P's method; analysis.read.align), then
the earliest aligned event start becomes 0. Frames (one row one thing, long form):

- events:  rank, step, mb, layer, kind, lane, start, end, tb, peer, tag, bytes, pair
           (tb: aligned time the rank began to block on a send/recv, NaN for other kinds;
            lane: compute | send | recv | copy | step; pair: NA when empty)
- pebbles: rank, step, mb, layer, kind, bytes, stored, freed   (freed NaN = never freed)
- memory:  rank, time, source, bytes
- stats:   step, rank, loss, grad_norm, update_norm, step_time  (step_time in seconds)

`load_run` holds the whole run in memory: for notebooks and small runs. A run of any length is
read in chunks of steps with `analysis.read.scan.open_run(path)` (`.chunk(a, b)`, `.plan()`), which
is what `python -m analysis.pebble` does.

The loader reads partial runs (a crashed or running job): it loads what is there, drops a
truncated last line or batch, and explains every gap in `Run.warnings`. It raises
RunFormatError, naming the file, only when the directory is not a run or a file is in a format
it does not know. Damaged rows of a CSV file (a stray quote, too many or too few fields, a value
that is not a number) are dropped and counted in a warning that names the file and their line
numbers. A run whose meta.json says "running" but whose processes are gone (harness.ops.heartbeat)
is reported as status "died".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.read.align import clock_offset_ns
from analysis.read.runmeta import divergence
from analysis.read.scan import EVENT_FRAME, MEMORY_FRAME, PEBBLE_FRAME, build_frames, open_run
from analysis.read.tracefile import _NA_VALUES, RunFormatError, read_table, read_trace

__all__ = ["Run", "RunFormatError", "load_run", "clock_offset_ns", "divergence", "read_table",
           "read_trace", "EVENT_FRAME", "PEBBLE_FRAME", "MEMORY_FRAME", "_NA_VALUES"]


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


def load_run(path) -> Run:
    """Load the run directory `path` into a Run (see the module docstring for the frames)."""
    idx = open_run(path)
    if len(idx.steps):
        c = idx.chunk(int(idx.steps[0]), int(idx.steps[-1]))
        ev, peb, mem = c.events, c.pebbles, c.memory
    else:
        ev, peb, mem = build_frames({k: {} for k in ("events", "pebbles", "memory")},
                                    idx.meta, idx.origin)
    return Run(idx.path, idx.meta, ev, peb, mem, idx.stats, idx.schedule, idx.origin,
               list(idx.complete), list(idx.warnings))
