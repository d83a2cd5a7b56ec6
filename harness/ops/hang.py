"""Hangs explained: what each rank is blocked on, and one diagnosis of who waits for whom.

A rank blocked in an MPI call cannot answer over MPI, so the reports go through files. Each rank
keeps `ranks/blocked.r<R>.json` in its own directory (run.local_dir): its comm watchdog thread,
which runs while the main thread sits in `Recv`, rewrites it every poll while the rank has been
stuck in one action for more than `threshold` s (step, action, and the blocking operation with
its peer, tag, pair id and microbatch, or "not in a communication call"). When the watchdog
fires (comm.timeout_s) or SIGUSR1 arrives, the rank marks its report triggered, waits a grace
period for the others' reports to be fresh, and the lowest triggered rank reads every report it
can see and prints one line:

    hang: rank 0 waits for G3.1 from rank 1; rank 1 waits for A3.2 from rank 0: a cycle (0 -> 1 -> 0)

A report is visible when its file is: every rank on the collector's host, and every rank when
the local directories are on a shared file system. A rank without a fresh report is "no report"
(dead, stopped, or on another host), and a chain of waits ending there names it the missing peer.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .. import runformat
from .watchdog import Where

SIZE = 2048  # bytes of the in-place record (padded), like harness.ops.heartbeat


def report_path(base: Path, rank: int) -> Path:
    return Path(base) / runformat.blocked_file(rank)


class Reporter:
    """Writes this rank's report and reads everyone's. `bases[r]`: rank r's directory (its
    run.local_dir, or the run directory), as this rank would name it."""

    def __init__(self, base: Path, rank: int, bases: list, threshold: float, fresh_s: float):
        self.rank, self.bases, self.threshold, self.fresh_s = rank, list(bases), threshold, fresh_s
        p = report_path(base, rank)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.host = socket.gethostname()
        self.trigger = None  # once triggered, every later write keeps saying so

    def write(self, where: Where, blocked: dict | None, stuck_s: float, trigger: str | None = None):
        self.trigger = trigger = self.trigger or trigger
        action = where.action
        rec = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "time": time.time(),
               "step": where.step, "action": None if action is None else repr(action),
               "stuck_s": round(stuck_s, 3), "blocked": blocked, "trigger": trigger}
        os.pwrite(self.fd, json.dumps(rec).encode().ljust(SIZE)[:SIZE], 0)

    def collect(self) -> dict:
        """rank -> its report, for every rank whose report is fresh and readable from here."""
        out, now = {}, time.time()
        for r, base in enumerate(self.bases):
            try:
                rec = json.loads(report_path(base, r).read_bytes().decode("utf-8", "replace").strip())
            except (OSError, ValueError):
                continue
            if rec and now - rec.get("time", 0) <= self.fresh_s:
                out[r] = rec
        return out

    def close(self):
        os.close(self.fd)


def short_pair(pair: str | None) -> str:
    """`G3.1.1>0` -> `G3.1` (stream, step, microbatch: what the message carries)."""
    return ".".join((pair or "?").split(".")[:2])


def _says(r: int, rec: dict | None) -> str:
    if rec is None:
        return f"rank {r} did not report (dead, stopped, or its file is not visible here)"
    b = rec.get("blocked")
    if b:
        what = short_pair(b.get("pair"))
        if b["op"] in ("recv", "wait_recv"):
            return f"rank {r} waits for {what} from rank {b['peer']}"
        return f"rank {r} waits to send {what} to rank {b['peer']}"
    where = (f"in {rec['action']}" if rec.get("action") else "before its first action"
             if rec.get("step", -1) >= 0 else "outside the steps")
    return (f"rank {r} is not in a communication call ({where} of step {rec.get('step')} "
            f"for {rec.get('stuck_s', 0):.1f} s)")


def diagnose(reports: dict, size: int) -> str:
    """One line: what every rank reported and the conclusion: the cycle of waits, or the rank at
    the end of the chain (not communicating, or missing). Pure: reports as Reporter.collect."""
    waits = {r: rec["blocked"]["peer"] for r, rec in reports.items() if rec.get("blocked")}
    involved = sorted(set(reports) | set(waits.values()))
    parts = [_says(r, reports.get(r)) for r in involved if 0 <= r < size]
    # a cycle: follow waits from every waiting rank
    for start in sorted(waits):
        seen, r = [], start
        while r in waits and r not in seen:
            seen.append(r)
            r = waits[r]
        if r in seen:
            cyc = seen[seen.index(r):] + [r]
            return ("hang: " + "; ".join(parts) + ": a cycle (" + " -> ".join(map(str, cyc))
                    + "), each waits for a message the next has not sent (a schedule mismatch)")
    # no cycle: the chains end at ranks that wait for nobody
    ends = sorted({_end(r, waits) for r in waits})
    if not waits:
        return "hang: " + "; ".join(parts) + ": no rank reported a blocked communication"
    concl = []
    for e in ends:
        if e not in reports:
            concl.append(f"the missing peer is rank {e}")
        else:
            concl.append(f"rank {e} holds the others up")
    return "hang: " + "; ".join(parts) + ": " + ", ".join(concl)


def _end(r: int, waits: dict) -> int:
    seen = set()
    while r in waits and r not in seen:
        seen.add(r)
        r = waits[r]
    return r
