"""The run-directory and trace contract (docs/run-format.md), written down once.

Everything that a writer (harness.trace.writer, harness.rundir, harness.run, harness.executor,
harness.synthetic) and a reader (analysis.read.load) must agree on lives here and only here: the format
version, the column lists, the file paths, the message tag and the send/receive pair id.
Pure Python, no third-party imports, so both sides (and tests) can import it cheaply.
"""
from __future__ import annotations

import re

FORMAT = 2  # the run-directory and trace format version this harness writes (meta.json "format")
FORMATS = (1, 2)  # the versions a reader knows: 1 = CSV trace files, 2 = Arrow IPC streams

# per-rank trace files, with these columns: format 2 writes trace/<kind>.r<R>.arrows (an Arrow
# IPC stream, one record batch per write); format 1 wrote trace/<kind>.r<R>.csv (one header
# line, then CSV)
EVENT_COLS = ("step", "mb", "layer", "kind", "t0", "t1", "tb", "peer", "tag", "bytes", "pair")
PEBBLE_COLS = ("step", "mb", "layer", "kind", "bytes", "t_store", "t_free",
               "module", "shape", "dtype")  # module: the innermost module that saved it
MEMORY_COLS = ("t", "source", "bytes")
TRACE_COLS = {"events": EVENT_COLS, "pebbles": PEBBLE_COLS, "memory": MEMORY_COLS}
# format 2's column types, as the writer (harness.trace.writer) declares them to Arrow: "?" marks
# a column that may be empty (null); "dict" is text, dictionary-encoded (a value is written once,
# in a dictionary delta, the first time it appears; the columns whose values repeat: kinds,
# module names, shapes); "string" is text that does not repeat (a message's pair id)
TRACE_TYPES = {
    "events": {"step": "int32", "mb": "int32", "layer": "int32", "kind": "dict", "t0": "int64",
               "t1": "int64", "tb": "int64?", "peer": "int32", "tag": "int32", "bytes": "int64",
               "pair": "string?"},
    "pebbles": {"step": "int32", "mb": "int32", "layer": "int32", "kind": "dict",
                "bytes": "int64", "t_store": "int64", "t_free": "int64?", "module": "dict",
                "shape": "dict", "dtype": "dict"},
    "memory": {"t": "int64", "source": "dict", "bytes": "int64"},
}
# per-rank stats (ranks/stats.r<R>.csv) and their merge (stats.csv)
# meta.json ranks[r].block_times: the microbatch sizes each block is timed at, batch / f
BLOCK_TIME_FRACTIONS = (1, 2, 4, 8, 16)   # the sizes of m = 1, 2, 4, 8, 16


def block_time_rows(batch: int, mb_rows: int) -> list[int]:
    """The microbatch sizes timed at set-up: batch/f for each f in BLOCK_TIME_FRACTIONS (at
    least 1 row) and the run's own microbatch size, ascending."""
    return sorted({max(1, batch // f) for f in BLOCK_TIME_FRACTIONS} | {mb_rows})


STATS_COLS = ("step", "rank", "loss", "grad_norm", "update_norm", "step_time")

# the lane (row of the timeline) of each event kind
LANE = {"fwd": "compute", "bwd": "compute", "bwd_in": "compute", "bwd_w": "compute",
        "loss": "compute", "opt": "compute", "norms": "compute",
        "send": "send", "recv": "recv", "d2h": "copy", "h2d": "copy", "step": "step",
        # a recomputation inside a bwd span (pipeline.recompute): an annotation of compute
        "recompute": "recompute"}

# the kinds whose spans are the rank's computation (busy time, the bubble's complement)
COMPUTE = tuple(k for k, lane in LANE.items() if lane == "compute")

MAGIC = re.compile(r"#\s*harness-trace\s+(.*)")


HEADER_KEY = "harness-trace"   # format 2: the header is this key of the Arrow schema's metadata


def trace_header(kind: str, rank: int, fmt: int = FORMAT) -> str:
    """The first line of a format 1 (CSV) trace file, without newline; for format 2, with the
    leading "# harness-trace " cut off, the value of the schema metadata key HEADER_KEY."""
    return f"# harness-trace format={fmt} kind={kind} rank={rank}"


def parse_header(line: str) -> dict | None:
    """Fields of a trace header line ({format, kind, rank} as strings), or None if it is not one."""
    m = MAGIC.match(line.strip())
    if not m:
        return None
    return dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)


# -- paths, relative to the run directory ------------------------------------------------------
TRACE_DIR, RANKS_DIR = "trace", "ranks"
TRACE_FILE = re.compile(r"^(events|pebbles|memory)\.r(\d+)\.(csv|arrows)$")
TRACE_EXT = {1: "csv", 2: "arrows"}


def trace_file(kind: str, rank: int, fmt: int = FORMAT) -> str:
    return f"{TRACE_DIR}/{kind}.r{rank}.{TRACE_EXT[fmt]}"


def kineto_file(rank: int) -> str:
    """torch.profiler's Chrome-trace export of `trace.kineto` steps (harness.trace.kineto)."""
    return f"{TRACE_DIR}/kineto.r{rank}.json"


def stats_file(rank: int) -> str:
    return f"{RANKS_DIR}/stats.r{rank}.csv"


def log_file(rank: int) -> str:
    return f"{RANKS_DIR}/rank{rank}.log"


def weights_file(rank: int) -> str:
    return f"{RANKS_DIR}/weights.r{rank}.pt"


def heartbeat_file(rank: int) -> str:
    """Rewritten in place every step (harness.ops.heartbeat)."""
    return f"{RANKS_DIR}/heartbeat.r{rank}.json"


# A rank's scratch, never part of a finished run directory: its hang report (harness.ops.hang,
# deleted at a clean end) and the disk space it holds back to record a failure (harness.ops.rundir)
def blocked_file(rank: int) -> str:
    return f"{RANKS_DIR}/blocked.r{rank}.json"


def reserve_file(rank: int) -> str:
    return f"{RANKS_DIR}/.reserve.r{rank}"


RESERVE_GLOB = f"{RANKS_DIR}/.reserve.r*"      # every rank's reserve
RANK_DIRS = (RANKS_DIR, TRACE_DIR)             # where a rank writes its own files


def rank_file_pattern(rank: int) -> re.Pattern:
    """Names (in RANK_DIRS) of the files rank `rank` writes for the run directory,
    `<kind>.r<R>.<ext>` and `rank<R>.log`, its scratch excluded."""
    return re.compile(rf"^(?!\.reserve|blocked)[\w.-]*\.r{rank}\.\w+$|^rank{rank}\.log$")


# -- messages -------------------------------------------------------------------------------
# A pipeline message is one stream ("act" flows stage s -> s+1, "grad" flows s+1 -> s) for one
# microbatch. Its MPI tag and its pair id (which joins the send row to the receive row in the
# trace) are functions of that alone, so sender and receiver compute the same values.
STREAM_LETTER = {"act": "A", "grad": "G"}


# With virtual stages (pipeline.virtual=v) a rank pair can carry the messages of several stage
# boundaries; `chunk` is the chunk index of the boundary's upstream stage (the one that sends the
# activation and receives the gradient), which tells them apart. chunk=0 leaves tag and pair id
# exactly as they were before chunks existed.
CHUNK_TAGS = 4096   # tags per chunk: microbatches < 2048, chunks < 7 keep tags below CLOCK_TAG


def tag(stream: str, mb: int, chunk: int = 0) -> int:
    """MPI tag of a message: 2·mb for activations, 2·mb+1 for gradients, + 4096·chunk (all far
    below comm.CLOCK_TAG = 32000)."""
    if not (0 <= mb < CHUNK_TAGS // 2 and 0 <= chunk < 7):
        raise ValueError(f"message tag: microbatch {mb} / chunk {chunk} out of range "
                         f"(microbatches < {CHUNK_TAGS // 2}, chunks < 7)")
    return 2 * mb + (stream == "grad") + CHUNK_TAGS * chunk


def pair_id(stream: str, step: int, mb: int, src: int, dst: int, chunk: int = 0) -> str:
    """`A3.1.0>1`: activation of step 3, microbatch 1, from rank 0 to rank 1 (G: gradient);
    `A3.1.0>1c1` the same for the boundary whose upstream stage is chunk 1."""
    return f"{STREAM_LETTER[stream]}{step}.{mb}.{src}>{dst}" + (f"c{chunk}" if chunk else "")
