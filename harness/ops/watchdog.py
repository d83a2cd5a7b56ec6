"""The comm watchdog: a blocking call that outlives comm.timeout_s ends the job, and while the
main thread is stuck the rank's hang report (harness.ops.hang) stays fresh.

The transport (harness.core.comm.P2P) marks each blocking call on the watchdog (`blocked`), the
train loop and the executor's dispatch loop say where the main thread is (`Where`); the watchdog
thread only reads both (it never touches MPI).
"""
from __future__ import annotations

import threading
import time


class Where:
    """What the rank's main thread is doing: written by the train loop and the executor's
    dispatch loop (plain attribute writes), read by the watchdog thread."""
    __slots__ = ("action", "seq", "step")

    def __init__(self):
        self.step, self.action, self.seq = -1, None, 0

    def at(self, step: int, action) -> None:
        self.step, self.action = step, action
        self.seq += 1


class Watchdog(threading.Thread):
    """Aborts via `on_timeout(what)` when one blocking call lasts longer than `timeout_s`.

    It also feeds the hang report (harness.ops.hang): while the main thread has been in one action
    for longer than the reporter's threshold, it rewrites the rank's report every poll, so that
    whichever rank's watchdog fires first can read what every rank is blocked on."""

    def __init__(self, timeout_s: float, on_timeout):
        super().__init__(name="comm-watchdog", daemon=True)
        self.timeout_s, self.on_timeout = timeout_s, on_timeout
        # (deadline on time.monotonic, description, op, peer, tag, pair, step, mb) while in a
        # blocking call
        self.blocked = None
        self.where = Where()
        self.reporter = None  # harness.ops.hang.Reporter, set by the run once the directories exist
        self.poll = min(0.5, timeout_s / 10)
        self._since = time.monotonic()  # when the main thread entered its current action
        self._stop_evt = threading.Event()

    def blocked_info(self) -> dict | None:
        b = self.blocked
        if b is None:
            return None
        return dict(zip(("op", "peer", "tag", "pair", "step", "mb"), b[2:])) or None

    def report(self, trigger: str | None = None) -> None:
        """Write this rank's hang report now (any thread); `trigger` marks it as the one that
        asks for a diagnosis."""
        rep = self.reporter
        if rep is not None:
            try:
                rep.write(self.where, self.blocked_info(), time.monotonic() - self._since,
                          trigger)
            except OSError:  # a full disk must not kill the watchdog
                pass

    def run(self):
        seq = None
        while not self._stop_evt.wait(self.poll):
            b, now = self.blocked, time.monotonic()
            if self.where.seq != seq:
                seq, self._since = self.where.seq, now
            rep = self.reporter
            if rep is not None and now - self._since > rep.threshold:
                self.report()
            if b is not None and now > b[0]:
                self.on_timeout(b[1])
                return

    def stop(self):
        self._stop_evt.set()
