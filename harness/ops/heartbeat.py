"""Per-rank heartbeats, and telling a dead run from a live one after the fact.

A rank killed by SIGKILL, the OOM killer or a power cut cannot record anything, so its
meta.json says "running" forever. Each rank therefore keeps `ranks/heartbeat.r<R>.json`: one
JSON object (host, pid and its start time, last completed step, wall time, longest step time)
rewritten in place every step with one `pwrite` of a fixed size — no new file, no new disk
blocks, so it works on a full disk too. `judge` reads them: a rank is dead when its host is this
host and its process is gone (or the pid now belongs to another process), or, on another host,
when its heartbeat is older than a generous margin (STALE_MIN_S, 20 step times, 2 comm
timeouts). A run that may be alive is never called dead.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import psutil

from .. import runformat

SIZE = 512          # bytes of the in-place record (padded with spaces)
STALE_MIN_S = 600.0  # a remote rank is presumed dead only after at least this long unseen


def path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / runformat.heartbeat_file(rank)


def _process_start(pid: int) -> float | None:
    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except psutil.Error:
        return None


class Heartbeat:
    """One rank's heartbeat file; `beat(step, step_time)` after every completed step."""

    def __init__(self, run_dir: Path, rank: int, timeout_s: float):
        self.fd = os.open(path(run_dir, rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.base = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                     "pid_start": _process_start(os.getpid()), "timeout_s": timeout_s}
        self.longest = 0.0
        self.beat(-1, 0.0)  # -1: no step completed yet

    def beat(self, step: int, step_time: float) -> None:
        self.longest = max(self.longest, step_time)
        rec = dict(self.base, step=step, time=time.time(), step_time=self.longest)
        os.pwrite(self.fd, json.dumps(rec).encode().ljust(SIZE)[:SIZE], 0)

    def close(self) -> None:
        os.close(self.fd)


def read(p: Path) -> dict | None:
    try:
        return json.loads(Path(p).read_bytes().decode("utf-8", "replace").strip() or "null")
    except (OSError, ValueError):
        return None


def judge(run_dir: Path, meta: dict, now: float | None = None, bases: list | None = None
          ) -> str | None:
    """For a run whose meta.json says "running": None while it may be alive, else
    "died: rank R last seen at step N, T s ago" (of the dead ranks, the one seen longest ago).
    A rank's heartbeat is read from the run directory, else from its run.local_dir (meta.json's
    `ranks[i].local_dir`, or `bases[r]`)."""
    if meta.get("status") != "running":
        return None
    now = time.time() if now is None else now
    here = socket.gethostname()
    dead = []  # (last seen, message)
    for info in meta.get("ranks") or []:
        r = info.get("rank")
        hb = read(path(run_dir, r))
        local = bases[r] if bases and r is not None and r < len(bases) else info.get("local_dir")
        if hb is None and local:
            hb = read(path(local, r))
        hb = hb or {}
        host, pid = hb.get("host", info.get("host")), hb.get("pid", info.get("pid"))
        t, step = hb.get("time"), hb.get("step", -1)
        if host == here and pid:
            start = _process_start(int(pid))
            want = hb.get("pid_start")
            if start is not None and (want is None or abs(start - want) < 1.0):
                continue  # that very process is still there
        elif t is None or now - t <= max(STALE_MIN_S, 20 * hb.get("step_time", 0),
                                         2 * hb.get("timeout_s", 0)):
            continue  # another host: only a heartbeat stale by a wide margin means dead
        seen = f"at step {step}" if step is not None and step >= 0 else "before its first step"
        ago = f", {now - t:.0f} s ago" if t is not None else ""
        dead.append((t if t is not None else float("inf"), f"died: rank {r} last seen {seen}{ago}"))
    # the rank seen last the longest ago most likely died first (the others were then killed)
    return min(dead)[1] if dead else None
