"""torch.profiler (Kineto) traces of `trace.kineto` steps, put on the run's aligned clock.

Each rank's `trace/kineto.r<R>.json` is torch's Chrome-trace export: CPU operators (`cpu_op`),
our action ranges (`user_annotation`, `PP:0F1`) and, on CUDA, kernels, memcpys and the runtime
calls. Kineto's clock (µs) is mapped onto the rank's trace clock with the `harness:clock:<ns>`
anchor ranges the harness recorded when the window opened and closed (harness.trace.kineto),
then aligned to rank 0 like every other time (analysis.read.load.clock_offset_ns). The events go
into trace.json under our spans: the same process (pid = rank), on lanes of their own —
`kineto cpu <thread>` (tid 100+) and `kineto gpu <stream>` (tid 200+) — since Kineto's slices
nest within its threads, not with our lanes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analysis.chrome import append_events
from analysis.read.align import clock_offset_ns
from harness.runformat import kineto_file
from harness.trace.kineto import ANCHOR

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation"}
CPU_CATS = {"cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"}


def local_offset_ns(events: list) -> float | None:
    """ns to add to Kineto's ts·1000 to get the rank's trace clock, from the anchor ranges."""
    diffs = [int(e["name"][len(ANCHOR):]) - e["ts"] * 1000.0 for e in events
             if e.get("ph") == "X" and str(e.get("name", "")).startswith(ANCHOR)]
    return max(diffs) if diffs else None


def rank_events(run, rank: int, warnings: list | None = None) -> list[dict]:
    """The Kineto slices of one rank as Chrome-trace events on the run's aligned clock
    (ts/dur in µs since the run's start, pid = rank), anchors left out. [] when absent."""
    p = Path(run.path) / kineto_file(rank)
    if not p.exists():
        return []
    try:
        evs = json.loads(p.read_text()).get("traceEvents", [])
    except (OSError, ValueError) as e:
        if warnings is not None:
            warnings.append(f"{p}: unreadable Kineto trace ({e}); not merged")
        return []
    off = local_offset_ns(evs)
    if off is None:
        if warnings is not None:
            warnings.append(f"{p}: no harness:clock anchors; not merged")
        return []
    xs = [e for e in evs if e.get("ph") == "X" and e.get("cat") in CPU_CATS | GPU_CATS
          and not str(e.get("name", "")).startswith(ANCHOR)]
    if not xs:
        return []
    local = np.array([e["ts"] * 1000.0 + off for e in xs])
    aligned = local + clock_offset_ns(run.meta, rank, local.astype(np.int64))
    ts = (aligned - run.origin_ns) / 1e3
    lanes: dict = {}
    out = []
    for e, t in zip(xs, ts.tolist()):
        gpu = e.get("cat") in GPU_CATS
        key = (gpu, e.get("pid"), e.get("tid"))
        if key not in lanes:
            lanes[key] = (200 if gpu else 100) + sum(1 for k in lanes if k[0] == gpu)
        out.append({"name": str(e.get("name")), "cat": f"kineto.{e.get('cat')}", "ph": "X",
                    "ts": round(t, 3), "dur": round(float(e.get("dur", 0)), 3), "pid": rank,
                    "tid": lanes[key]})
    for (gpu, _pid, tid), lane in lanes.items():
        label = f"kineto gpu stream {tid}" if gpu else f"kineto cpu thread {tid}"
        out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": lane,
                    "args": {"name": label}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": lane,
                    "args": {"sort_index": lane}})
    return out


def events(run, warnings: list | None = None) -> list[dict]:
    """Every rank's Kineto events (see rank_events)."""
    return [e for r in range(run.world_size) for e in rank_events(run, r, warnings)]


def merge_into(trace_json: Path, run, warnings: list | None = None) -> int:
    """Add the run's Kineto events to an existing trace.json; -> how many were added."""
    evs = events(run, warnings)
    return append_events(trace_json, [json.dumps(e) for e in evs]) if evs else 0
