"""The run-directory and trace contract (docs/run-format.md), written down once.

Everything that a writer (harness.trace.writer, harness.rundir, harness.run, harness.executor,
harness.synthetic) and a reader (analysis.load) must agree on lives here and only here: the format
version, the column lists, the file paths, the message tag and the send/receive pair id.
Pure Python, no third-party imports, so both sides (and tests) can import it cheaply.
"""
from __future__ import annotations

import re

FORMAT = 1  # the run-directory and trace format version (meta.json "format", trace headers)

# per-rank trace files: trace/<kind>.r<R>.csv, one header line, then CSV with these columns
EVENT_COLS = ("step", "mb", "layer", "kind", "t0", "t1", "tb", "peer", "tag", "bytes", "pair")
PEBBLE_COLS = ("step", "mb", "layer", "kind", "bytes", "t_store", "t_free",
               "module", "shape", "dtype")  # module: the innermost module that saved it
MEMORY_COLS = ("t", "source", "bytes")
TRACE_COLS = {"events": EVENT_COLS, "pebbles": PEBBLE_COLS, "memory": MEMORY_COLS}
# per-rank stats (ranks/stats.r<R>.csv) and their merge (stats.csv)
STATS_COLS = ("step", "rank", "loss", "grad_norm", "update_norm", "step_time")

# the lane (row of the timeline) of each event kind
LANE = {"fwd": "compute", "bwd": "compute", "loss": "compute", "opt": "compute", "norms": "compute",
        "send": "send", "recv": "recv", "d2h": "copy", "h2d": "copy", "step": "step"}

MAGIC = re.compile(r"#\s*harness-trace\s+(.*)")


def trace_header(kind: str, rank: int) -> str:
    """The first line of a trace file (without newline)."""
    return f"# harness-trace format={FORMAT} kind={kind} rank={rank}"


def parse_header(line: str) -> dict | None:
    """Fields of a trace header line ({format, kind, rank} as strings), or None if it is not one."""
    m = MAGIC.match(line.strip())
    if not m:
        return None
    return dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)


# -- paths, relative to the run directory ------------------------------------------------------
TRACE_DIR, RANKS_DIR = "trace", "ranks"
TRACE_FILE = re.compile(r"^(events|pebbles|memory)\.r(\d+)\.csv$")


def trace_file(kind: str, rank: int) -> str:
    return f"{TRACE_DIR}/{kind}.r{rank}.csv"


def kineto_file(rank: int) -> str:
    """torch.profiler's Chrome-trace export of `trace.kineto` steps (harness.trace.kineto)."""
    return f"{TRACE_DIR}/kineto.r{rank}.json"


def stats_file(rank: int) -> str:
    return f"{RANKS_DIR}/stats.r{rank}.csv"


def log_file(rank: int) -> str:
    return f"{RANKS_DIR}/rank{rank}.log"


def weights_file(rank: int) -> str:
    return f"{RANKS_DIR}/weights.r{rank}.pt"


# -- messages -------------------------------------------------------------------------------
# A pipeline message is one stream ("act" flows stage s -> s+1, "grad" flows s+1 -> s) for one
# microbatch. Its MPI tag and its pair id (which joins the send row to the receive row in the
# trace) are functions of that alone, so sender and receiver compute the same values.
STREAM_LETTER = {"act": "A", "grad": "G"}


def tag(stream: str, mb: int) -> int:
    """MPI tag of a message: 2·mb for activations, 2·mb+1 for gradients (far below comm.CLOCK_TAG)."""
    return 2 * mb + (stream == "grad")


def pair_id(stream: str, step: int, mb: int, src: int, dst: int) -> str:
    """`A3.1.0>1`: activation of step 3, microbatch 1, from rank 0 to rank 1 (G: gradient)."""
    return f"{STREAM_LETTER[stream]}{step}.{mb}.{src}>{dst}"
