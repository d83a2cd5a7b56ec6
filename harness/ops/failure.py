"""What a rank does when something goes wrong: one run's failure policy.

Any exception on the main thread (`on_exception`), a signal (`on_signal`, from the signal
thread), or a blocking call that outlives comm.timeout_s (`on_timeout`, from the watchdog
thread) ends the same way: the rank says it once (a traceback, or one line when the cause is
known: a dead peer, another rank that failed first, a stop), records it in meta.json before
anything else, copies its local files back where it can, and brings the job down with
MPI_Abort. A hang is explained first (harness.ops.hang): every rank that can still answer reports
what it is blocked on, and the lowest rank that asked prints one diagnosis. A non-finite loss
or gradient norm stops the run, or is recorded once (`check_finite`).

The policy reads the run's directories and files from its session (harness.ops.session), and
the watchdog and tracer once the rank has them (`watch`); the training loop keeps `step` and
`done` up to date.
"""
from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
import traceback

from mpi4py import MPI

from ..core import comm
from . import hang, localdir, rundir
from .heartbeat import judge


class Stopped(RuntimeError):
    """The run was stopped for a reason its message states in full: one line, no traceback."""


class Diverged(Stopped):
    """A non-finite loss or gradient norm (train.stop_on_nonfinite=true)."""


class FailurePolicy:
    """One rank's answer to failures. cfg: the run's config (None in tests); session: its
    harness.ops.session.Session (directories and files, None until known); comm: the job's
    collectives (harness.core.comm: MPI)."""

    def __init__(self, cfg, rank: int, size: int, session, comm=comm):
        self.cfg, self.rank, self.size, self.session, self.comm = cfg, rank, size, session, comm
        self.step = -1   # the step in progress (-1: setting up); steps are numbered from 0
        self.done = False  # meta.json says complete: a late signal is no failure any more
        self.watchdog = self.tracer = None
        self.nonfinite = None   # where this rank first saw a non-finite loss or gradient norm
        self.hang_grace_s = 0.0

    def watch(self, watchdog, tracer) -> None:
        """The rank's comm watchdog (harness.ops.watchdog) and tracer, once they exist: the
        watchdog gets this rank's hang report, written by its thread once the rank has been
        stuck in one action for `threshold` s and fresh for long enough that a rank that waits
        `hang_grace_s` after its own trigger still sees the others'; the tracer is flushed on a
        failure."""
        s, poll = self.session, watchdog.poll
        threshold = min(2.0, self.cfg.comm.timeout_s / 4)
        self.hang_grace_s = threshold + 2 * poll
        watchdog.reporter = hang.Reporter(s.base, self.rank, s.bases, threshold,
                                          fresh_s=self.hang_grace_s + 2 * poll + 1.0)
        self.watchdog, self.tracer = watchdog, tracer

    def close(self) -> None:
        """A clean end: the hang report goes."""
        rep = self.watchdog and self.watchdog.reporter
        if rep is not None:
            rep.close()
            hang.report_path(self.session.base, self.rank).unlink(missing_ok=True)

    def when(self) -> str:
        return f"at step {self.step}" if self.step >= 0 else "during setup"

    def check_finite(self, step: int, out: dict) -> None:
        """The first non-finite loss (last stage) or gradient norm (every rank) stops the run,
        or with train.stop_on_nonfinite=false is reported once and recorded in meta.json."""
        if self.nonfinite is not None:
            return
        bad = [(k, out[k]) for k in ("loss", "grad_norm")
               if out.get(k) is not None and not math.isfinite(out[k])]
        if not bad:
            return
        what = ", ".join(f"{k} {v}" for k, v in bad)
        self.nonfinite = {"step": step, "rank": self.rank, "what": what}
        if self.cfg.train.stop_on_nonfinite:
            raise Diverged(f"diverged: non-finite {what} at step {step} on rank {self.rank} "
                           f"(train.stop_on_nonfinite=false keeps training)")
        msg = (f"warning: non-finite {what} at step {step} on rank {self.rank}; training goes "
               f"on (train.stop_on_nonfinite=false)")
        self.session.files.log(msg)
        print(f"[rank {self.rank}] {msg}", file=sys.stderr, flush=True)

    def nonfinite_everywhere(self) -> list:
        """Collective: on rank 0 every rank's first non-finite value (empty elsewhere)."""
        return [x for x in self.comm.gather(self.nonfinite) or [] if x]

    def on_exception(self, e: BaseException) -> int:
        """The main thread's exception, whatever it is: say it once, record it, end the job."""
        tb = traceback.format_exc()
        msg = str(e)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            s = self.session
            msg, tb = (f"disk full: no space left on the device of {s.base or s.run_path} "
                       f"({self.when()})"), ""
        elif isinstance(e, Stopped):
            tb = ""
        died, first = self.peer_cause(e) if self.size > 1 else (None, None)
        if died:  # an MPI error because a peer process vanished (SIGKILL, OOM killer)
            self.fail("Died", f"{died}; this rank then failed: {type(e).__name__}: "
                      f"{msg.splitlines()[0] if msg else ''}", "")
        elif first:  # a communication error because another rank failed and went first
            self.fail(type(e).__name__, f"{first}; this rank's communication then failed: "
                      f"{msg.splitlines()[0] if msg else ''}", "")
        else:
            self.fail(type(e).__name__, msg, tb)
        if self.size > 1:
            self.abort(1)
        return 1

    def peer_cause(self, e: BaseException, settle_s: float = 2.0) -> tuple:
        """(dead peer, another rank's earlier failure): what else explains this exception. An
        MPI error on this rank usually comes from a peer that vanished or aborted, and it can
        arrive before that peer's death is visible (the kernel closes a killed process's
        sockets and shared memory before it becomes a zombie) or before its failure is in
        meta.json: for an MPI error, look again for up to settle_s."""
        deadline = time.monotonic() + (settle_s if self.comm_error(e) else 0.0)
        while True:
            died = self.dead_peer()
            first = None if died else self.failed_first(e)
            if died or first or time.monotonic() >= deadline:
                return died, first
            time.sleep(0.1)

    def fail(self, exc_type: str, message: str, tb: str, extra: dict | None = None):
        """Say it (a traceback, or one line when `tb` is empty), then record it: meta.json
        first (it must succeed, even on a full disk), then the rank's log and trace."""
        s, problem = self.session, None
        if s.base and s.base != s.run_dir:  # room on the local disk, for the log
            rundir.release(s.base, self.rank)
        if s.run_dir:  # first: when the launcher is gone, writing to stderr can kill us
            try:
                rundir.mark_failed(s.run_dir, self.rank, exc_type, message, extra)
            except Exception as e:  # noqa: BLE001 - recording the failure must not mask it
                problem = (f"[rank {self.rank}] could not record the failure in "
                           f"{s.run_dir / 'meta.json'}: {e}\n")
        try:
            if tb:
                sys.stderr.write(f"[rank {self.rank}] harness.run failed; aborting the job\n{tb}")
            else:
                sys.stderr.write(f"[rank {self.rank}] harness.run: error: {message}; "
                                 f"aborting the job\n")
            sys.stderr.write(problem or "")
            sys.stderr.flush()
        except OSError:  # nobody is listening any more
            pass
        for record in (lambda: s.files and s.files.log(f"FAILED: {message}\n{tb}"),
                       lambda: self.tracer and self.tracer.flush(),
                       self._copy_back):
            try:
                record()
            except Exception:  # noqa: BLE001 - best effort (the disk may be full); meta.json has it
                pass

    @staticmethod
    def comm_error(e: BaseException) -> bool:
        """Is `e` an error of the job's message library (which a peer's end can cause)?"""
        return isinstance(e, MPI.Exception)

    def abort(self, code: int):
        """MPI_Abort the job, a moment after this rank's last words: mpiexec kills every process
        at once, and a line still on its way through the launcher's stderr forwarding would be
        lost (seen: a rank's one-line error never reaching the terminal)."""
        sys.stderr.flush()
        time.sleep(0.3)
        self.comm.abort(code)

    def dead_peer(self) -> str | None:
        """'died: rank R last seen at step N, T s ago' if another rank's process is gone (its
        heartbeat, harness.ops.heartbeat.judge), else None."""
        s = self.session
        if not s.run_dir:
            return None
        peers = {"status": "running", "ranks": [{"rank": r} for r in range(self.size)
                                                if r != self.rank]}
        try:
            return judge(s.run_dir, peers, bases=s.bases)
        except Exception:  # noqa: BLE001 - a judgement we cannot make is no judgement
            return None

    def failed_first(self, e: BaseException) -> str | None:
        """For an MPI error on this rank: 'rank R failed first (Type: message)' when meta.json
        already records another rank's failure (that rank aborted the job, and its exit broke a
        transfer in progress here, e.g. a shared-memory copy from its address space), else None.
        Then the cause is the other rank's, and this rank's traceback would only bury it."""
        return self.other_failed() if self.comm_error(e) else None

    def other_failed(self) -> str | None:
        """'rank R failed first (Type: message)' when meta.json records another rank's
        failure, else None."""
        run_dir = self.session.run_dir
        if not run_dir:
            return None
        try:
            err = json.loads((run_dir / "meta.json").read_text()).get("error") or {}
        except (OSError, ValueError):
            return None
        if err.get("rank") in (None, self.rank):
            return None
        return f"rank {err['rank']} failed first ({err.get('type')}: {err.get('message')})"

    def _copy_back(self):
        """On a failure, as far as it can: the local files to the run directory through the
        file system, when this rank can reach it (MPI may be unusable by now)."""
        s = self.session
        if self.cfg and self.cfg.run.local_dir and s.run_dir and s.base:
            localdir.copy_back(s.base, s.run_dir, self.rank)

    def explain_hang(self, trigger: str) -> str | None:
        """Watchdog or SIGUSR1: report what this rank is blocked on, wait for the others'
        reports, and, if this is the lowest rank that asked, print one diagnosis (harness.ops.hang).
        -> the diagnosis, or None when another rank gives it (or there is nothing to report)."""
        wd = self.watchdog
        if wd is None or wd.reporter is None:
            return None
        wd.report(trigger)
        time.sleep(self.hang_grace_s)  # the others' watchdogs rewrite their reports meanwhile
        reports = wd.reporter.collect()
        asked = [r for r, x in reports.items() if x.get("trigger")] or [self.rank]
        if min(asked) != self.rank:
            time.sleep(2 * self.hang_grace_s)  # rank min(asked) prints it and ends the job
            return None
        diag = hang.diagnose(reports, self.size)
        try:
            sys.stderr.write(f"[rank {self.rank}] {diag}\n")
            sys.stderr.flush()
            self.session.files.log(diag)
        except (OSError, ValueError):
            pass
        return diag

    def on_signal(self, name: str, signum: int):
        """Signal thread (harness.ops.signals): SIGTERM and friends end the run as a failure;
        SIGUSR1 first explains what every rank is blocked on (harness.ops.hang)."""
        diag = self.explain_hang(name) if name == "SIGUSR1" and not self.done else None
        if not self.done:
            # mpirun terminates the survivors when a rank was killed: then name the dead rank
            died = self.dead_peer()
            if died:
                self.fail("Died", f"{died}; the job was then terminated ({name})", "")
            else:
                self.fail("Terminated", f"terminated by {name} {self.when()}", "",
                          {"diagnosis": diag} if diag else None)
        if self.size > 1:
            self.abort(128 + signum)
        os._exit(128 + signum)

    def on_timeout(self, what: str):
        """Watchdog thread: a blocking call outlived comm.timeout_s."""
        msg = (f"rank {self.rank}: {what} did not complete within "
               f"comm.timeout_s={self.cfg.comm.timeout_s:g} s")
        diag = self.explain_hang("watchdog")
        self.fail("CommTimeout", msg, msg + "\n", {"diagnosis": diag} if diag else None)
        self.abort(3)
