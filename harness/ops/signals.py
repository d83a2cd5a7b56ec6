"""The signals a batch scheduler or a user sends, taken through the run's failure path.

SIGTERM (a scheduler's time limit; `mpirun` forwards it to every rank), SIGINT (Ctrl-C),
SIGHUP and SIGUSR1/2 (schedulers' early warnings) are blocked in every thread and taken by one
thread with `sigwait`. A Python handler would run only in the main thread and only between
bytecodes, never while that thread sits inside a blocking MPI call; a thread that waits for the
signal records the failure ("terminated by SIGTERM at step N") and aborts the job at any time.
`block()` must run before MPI and torch start their threads, which inherit the blocked mask.
What cannot be caught (SIGKILL, the OOM killer, power loss) is detected afterwards from the
ranks' heartbeats (harness.ops.heartbeat).
"""
from __future__ import annotations

import signal
import threading

CAUGHT = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def block() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, CAUGHT)


class Catcher(threading.Thread):
    """Waits for one of CAUGHT and calls `on_signal(name, signum)` (which ends the process)."""

    def __init__(self, on_signal):
        super().__init__(name="signal-catcher", daemon=True)
        self.on_signal = on_signal

    def run(self):
        signum = signal.sigwait(CAUGHT)
        self.on_signal(signal.Signals(signum).name, signum)
