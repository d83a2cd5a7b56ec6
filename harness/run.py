"""Entry point: `[mpirun -n P] python -m harness.run [exp=NAME] [key=value ...]`.

One process per pipeline stage. The order matters: the config is validated before any MPI
communication; then rank 0 creates the run directory and shares it; then every rank builds its
stage, writes its traces and stats while training, and rank 0 marks the run complete only after
every rank has finished. An exception on any rank is printed once (by that rank), recorded in
meta.json and brings the whole job down with MPI_Abort, so no rank is left blocked in a receive.
"""
from __future__ import annotations

import errno
import json
import math
import os
import platform
import socket
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from . import config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        for w in config.unreadable_warnings():
            print(w, file=sys.stderr, flush=True)
        print(config.help_text())
        return 0
    from . import signals
    signals.block()  # before MPI and torch start threads: they inherit the blocked mask
    from . import comm  # initialises MPI (only now: --help must work without it)

    rank, size = comm.rank_size()
    if rank == 0:
        for w in config.unreadable_warnings():
            print(w, file=sys.stderr, flush=True)
    cfg, error = None, None
    try:
        cfg = config.load(argv, world_size=size)
    except config.ConfigError as e:
        error = str(e)
    # Every rank validates on its own and should reach the same verdict; agreeing on it (the
    # job's first communication) makes sure no rank trains while another has quit.
    errors = comm.allgather(error)
    if any(errors):
        first = next(r for r, e in enumerate(errors) if e)
        if rank == first:  # printed once
            print(f"harness.run: error: {errors[first]}", file=sys.stderr, flush=True)
        return 2
    return Run(cfg, rank, size).main()


class Stopped(RuntimeError):
    """The run was stopped for a reason its message states in full: one line, no traceback."""


class Diverged(Stopped):
    """A non-finite loss or gradient norm (train.stop_on_nonfinite=true)."""


class Run:
    def __init__(self, cfg, rank: int, size: int):
        self.cfg, self.rank, self.size = cfg, rank, size
        self.last = rank == size - 1
        self.run_dir = self.files = self.tracer = self.sampler = self.p2p = None
        self.base = self.run_path = self.kineto = self.bases = None
        self.heartbeat = self.nonfinite = self.thread_error = None
        self.step = -1   # the step in progress (-1: setting up); steps are numbered from 0
        self.done = False

    def main(self) -> int:
        from . import signals
        signals.Catcher(self.on_signal).start()
        try:
            if not self.setup_dir():
                return 2
            self.setup()
            self.train()
            self.finish()
            return 0
        except BaseException as e:  # noqa: BLE001 - whatever it is, the job must come down
            tb = traceback.format_exc()
            msg = str(e)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                msg, tb = (f"disk full: no space left on the device of {self.base or self.run_path} "
                           f"({self._when()})"), ""
            elif isinstance(e, Stopped):
                tb = ""
            died = self.dead_peer() if self.size > 1 else None
            first = self.failed_first(e) if self.size > 1 and not died else None
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

    def _when(self) -> str:
        return f"at step {self.step}" if self.step >= 0 else "during setup"

    # -- setup --------------------------------------------------------------------------------
    def setup_dir(self) -> bool:
        from . import comm, rundir
        decision = None
        if self.rank == 0:
            try:
                path, notice = rundir.choose(self.cfg.exp, self.cfg.run.dir)
                decision = (str(path), notice, None)
            except OSError as e:
                decision = (None, None, str(e))
        path, notice, error = comm.bcast(decision)
        if error:
            if self.rank == 0:
                print(f"harness.run: error: {error}", file=sys.stderr, flush=True)
            return False
        from . import localdir
        # run_path: the run directory's name, known everywhere; run_dir: the same, where this
        # rank can reach it through the file system (debug.no_shared_fs: rank 0 only)
        self.run_path = Path(path)
        hidden = self.cfg.debug.no_shared_fs and self.rank != 0
        self.run_dir = None if hidden else self.run_path
        # base: where this rank writes its own files (run.local_dir, or the run directory)
        self.base = localdir.base_dir(self.cfg.run.local_dir, self.run_path, self.run_path.name,
                                      self.rank, socket.gethostname())
        (self.base / "ranks").mkdir(parents=True, exist_ok=True)
        self.bases = [Path(b) for b in comm.allgather(str(self.base))]
        self.files = rundir.RankFiles(self.base, self.rank)
        # room to record a failure even when the disk fills up (rundir.mark_failed frees it)
        rundir.reserve(self.base, self.rank)
        from .heartbeat import Heartbeat
        self.heartbeat = Heartbeat(self.base, self.rank, self.cfg.comm.timeout_s)
        if notice and self.rank == 0:
            print(notice, file=sys.stderr, flush=True)
            self.files.log(notice)
        return True

    def setup(self):
        import torch

        from . import comm, debug_knobs, rundir, stage
        from . import schedule as S
        from .trace import clock as tclock
        from .trace import open_trace

        cfg, rank, size = self.cfg, self.rank, self.size
        self.start_time = rundir.now_iso()
        local_rank, local_size = comm.local_rank_size()
        threads = cfg.threads or max(1, config.cores_available() // local_size)
        torch.set_num_threads(threads)
        if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
            device = torch.device("cpu")
        else:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        cuda_aware = (comm.mpi_takes_cuda() if cfg.comm.cuda_aware == "auto"
                      else cfg.comm.cuda_aware == "true") and device.type == "cuda"

        mb_rows = cfg.data.batch_size // cfg.pipeline.microbatches
        self.stage = st = stage.build(cfg, rank, size, mb_rows, agree=comm.bcast)
        self.check_boundaries(st)
        bounds = self.bounds = st.bounds
        layers = st.layers.to(device)
        debug_knobs.apply(cfg.debug, rank, layers)  # test knobs (debug.slow_*), no-op by default
        opt = torch.optim.SGD(layers.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
        self.schedule = S.build(cfg.schedule, size, cfg.pipeline.microbatches,
                                **config.schedule_flags(cfg))

        d = cfg.debug
        skewed = d.clock_rank == rank
        self.clock = tclock.Clock(int(d.clock_offset_ms * 1e6) if skewed else 0,
                                  d.clock_drift_ppm if skewed else 0.0)
        timer = (tclock.CudaTimer(self.clock, device) if device.type == "cuda"
                 else tclock.HostTimer(self.clock))
        tracker, self.tracer, self.sampler, mem_status = open_trace(
            cfg.trace.enabled, self.base, rank, timer, self.clock.now,
            layers.parameters(), device, cfg.trace.sample_interval_ms / 1000)
        self.p2p = comm.P2P(self.tracer, self.clock.now, cfg.comm.timeout_s, self.on_timeout,
                            device, cuda_aware, cfg.comm.wait, cfg.comm.poll_us,
                            cfg.comm.spin_us)
        self.p2p.watchdog.reporter = self._reporter()
        if cfg.trace.kineto:
            from .trace.kineto import KinetoWindow
            self.kineto = KinetoWindow(config.parse_steps(cfg.trace.kineto), self.base, rank,
                                       device, self.clock.now)
        self.executor = self._executor(layers, bounds[rank], tracker, opt, device)
        self.layers = layers

        info = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(device), "local_rank": local_rank, "local_size": local_size,
                "cores": config.cores_available(), "threads": threads,
                "timer": timer.kind if cfg.trace.enabled else None, "memory_sources": mem_status,
                # where this rank wrote its files, when not in the run directory (run.local_dir)
                "local_dir": str(self.base) if cfg.run.local_dir else None,
                # the test knob's parameters, so a test can compute the true offset it injected
                "clock_knob": ({"offset_ns": self.clock.skew_ns, "drift_ppm": d.clock_drift_ppm,
                                "origin_ns": self.clock.origin} if skewed else None)}
        self.files.log(f"rank {rank}/{size} on {info['host']} pid {info['pid']}: {device}, "
                       f"{threads} threads, layers "
                       f"{' '.join(f'{a}..{b - 1}' for a, b in st.chunks)}, "
                       f"schedule {cfg.schedule} m={cfg.pipeline.microbatches}, "
                       f"cuda-aware MPI {cuda_aware}, memory sources {mem_status}")
        infos = comm.gather(info)
        if rank == 0:
            self.write_start_files(infos, bounds, cuda_aware)
            warn_oversubscribed(infos)
        comm.barrier()
        self.clock_start = comm.clock_offsets(self.clock.now, cfg.trace.clock_exchanges)
        if self.sampler:
            self.sampler.write_rows = self._kept_errors(self.sampler.write_rows)
            self.sampler.start()

    def _reporter(self):
        """This rank's hang report (harness.hang): written by the watchdog thread once the rank
        has been stuck in one action for `threshold` s; fresh for long enough that a rank that
        waits `hang_grace_s` after its own trigger still sees the others'."""
        from . import hang
        poll = self.p2p.watchdog.poll
        threshold = min(2.0, self.cfg.comm.timeout_s / 4)
        self.hang_grace_s = threshold + 2 * poll
        return hang.Reporter(self.base, self.rank, self.bases, threshold,
                             fresh_s=self.hang_grace_s + 2 * poll + 1.0)

    def _kept_errors(self, write):
        """The sampler thread's writes: an OSError (a full disk) is raised by the main thread
        after the step, through the failure path, instead of killing the thread."""
        def guarded(rows):
            try:
                write(rows)
            except OSError as e:
                self.thread_error = self.thread_error or e
        return guarded

    def _executor(self, layers, bounds, tracker, opt, device):
        from . import stage
        from . import schedule as S
        from .executor import StageExecutor
        cfg, st = self.cfg, self.stage
        return StageExecutor(
            rank=self.rank, size=self.size, layers=layers, bounds=bounds,
            n_layers=st.n_blocks, loss=st.loss, data=st.data, recv=st.recv,
            p2p=self.p2p, tracer=self.tracer, tracker=tracker, optimizer=opt, device=device,
            pipeline=cfg.pipeline, train=cfg.train, trace=cfg.trace, debug=cfg.debug,
            names=st.names, chunks=st.chunks, chunk_recv=st.chunk_recv,
            placement=S.placement_of(self.schedule),
            autocast=lambda: stage.autocast(cfg, device.type))

    def check_boundaries(self, st):
        """Every rank probed the boundary shapes itself; they must agree before the first step
        (a model whose blocks depend on something rank-local would otherwise hang or garble)."""
        from . import comm
        views = comm.allgather(st.boundary)
        bad = [r for r, v in enumerate(views) if v != views[0]]
        if bad:
            raise ValueError(f"ranks disagree on the model's boundary tensors: rank 0 "
                             f"{views[0]}, rank {bad[0]} {views[bad[0]]}")

    def write_start_files(self, infos, bounds, cuda_aware):
        from . import comm, rundir
        from . import schedule as S
        from .runformat import FORMAT
        cfg, d = self.cfg, self.run_dir
        rundir.write_atomic(d / "config.yaml", config.to_yaml(cfg))
        rundir.write_json(d / "schedule.json", S.to_json(self.schedule, cfg.schedule,
                                                         cfg.pipeline.microbatches,
                                                         cfg.pipeline.overlap))
        self.meta = {
            "format": FORMAT, "experiment": cfg.exp, "status": "running", "error": None,
            "world_size": self.size, "start_time": self.start_time, "end_time": None,
            "ranks": infos,
            "model": self.stage.info,
            "split": [list(b) for b in bounds],
            "schedule": {"name": cfg.schedule, "microbatches": cfg.pipeline.microbatches,
                         "virtual": cfg.pipeline.virtual,
                         "placement": S.placement_of(self.schedule).style,
                         "overlap": cfg.pipeline.overlap,
                         "recv_requires_grad": cfg.pipeline.recv_requires_grad,
                         "detach": cfg.pipeline.detach},
            # per microbatch bytes each stage saves, derived from the code (None: a model without
            # a formula, e.g. a user's factory)
            # (per rank, through all its chunks; peaks walked from the schedule)
            "pebbles_theory": S.pebble_theory(self.schedule, self.stage.act_bytes),
            "trace": {"enabled": cfg.trace.enabled, "format": FORMAT, "per_layer": cfg.trace.per_layer,
                      "sample_interval_ms": cfg.trace.sample_interval_ms},
            "clock": {"method": "ping-pong with rank 0, minimum round trip (Score-P)",
                      "exchanges": cfg.trace.clock_exchanges, "estimates": []},
            "versions": versions(), "mpi_library": comm.library(), "cuda_aware_mpi": cuda_aware,
            "comm": {"wait": cfg.comm.wait,
                     "poll_us": cfg.comm.poll_us if cfg.comm.wait != "spin" else None,
                     "spin_us": cfg.comm.spin_us if cfg.comm.wait == "backoff" else None},
        }
        rundir.write_json(d / "meta.json", self.meta)

    # -- training ------------------------------------------------------------------------------
    def train(self):
        cfg, ex = self.cfg, self.executor
        actions = self.schedule[self.rank]
        d = cfg.debug
        for step in range(cfg.train.steps):
            self.step = step
            self.p2p.where.at(step, None)
            acts = actions
            if d.mismatch_rank == self.rank and d.mismatch_step == step:  # test knob: a hang
                from .debug_knobs import mismatch
                acts = mismatch(actions)
            if self.kineto:
                self.kineto.before(step)
            t0 = time.perf_counter()
            out = ex.run_step(step, acts)
            dt = time.perf_counter() - t0
            self.tracer.flush()
            if self.kineto:
                self.kineto.after(step)
            self.files.stat(step, out["loss"], out["grad_norm"], out["update_norm"], dt)
            self.heartbeat.beat(step, dt)
            if self.thread_error:
                raise self.thread_error
            if out["loss"] is not None:  # the loss's rank; steps are numbered from 0 everywhere
                line = (f"step {step:>4}  ({step + 1}/{cfg.train.steps})  loss {out['loss']:.4f}  "
                        f"step time {dt * 1e3:.1f} ms")
                self.files.log(line)
                if not cfg.quiet:
                    print(line, flush=True)
            self.check_finite(step, out)

    def check_finite(self, step: int, out: dict):
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
        self.files.log(msg)
        print(f"[rank {self.rank}] {msg}", file=sys.stderr, flush=True)

    def finish(self):
        from . import comm, rundir, runformat
        if self.cfg.run.save_weights:
            import torch
            state = {gi: {k: v.detach().cpu() for k, v in blk.state_dict().items()}
                     for gi, blk in zip(self.executor.layer_ids, self.layers)}
            torch.save(state, self.base / runformat.weights_file(self.rank))
        clock_end = comm.clock_offsets(self.clock.now, self.cfg.trace.clock_exchanges)
        nonfinite = [x for x in comm.gather(self.nonfinite) or [] if x]
        if self.sampler:
            self.sampler.stop()
        if self.kineto:
            self.kineto.close()  # a window that runs past the last step
        self.tracer.close()
        self.p2p.close()
        self.files.close()
        comm.barrier()  # every rank's files are complete
        if self.cfg.run.local_dir:  # they travel to rank 0's run directory, checked
            self.transfer()
        if self.rank == 0:
            rundir.merge_stats(self.run_dir, self.size)
            est = [dict(e, phase="start") for e in self.clock_start[1:]]
            est += [dict(e, phase="end") for e in clock_end[1:]]
            self.meta.update(status="complete", end_time=rundir.now_iso())
            self.meta["clock"]["estimates"] = est
            if nonfinite:  # kept training past divergence: say where it began
                self.meta["nonfinite"] = min(nonfinite, key=lambda x: (x["step"], x["rank"]))
            rundir.write_json(self.run_dir / "meta.json", self.meta)
        self.done = True
        comm.barrier()  # meta.json says complete before anyone says the run is done
        self.heartbeat.close()
        rundir.release(self.base, self.rank)
        self._drop_report()
        if self.cfg.run.local_dir:
            from .localdir import tidy
            tidy(self.base, [])  # the scratch directory, if nothing is left in it
        if self.last:
            print(self.run_path, flush=True)

    def transfer(self):
        """run.local_dir: every rank's files to rank 0's run directory over MPI (collective).
        A file that failed its check stays at its rank, and the run fails naming it."""
        from . import comm, localdir
        out = localdir.gather(self.base, self.run_dir, self.rank, self.size, comm)
        if self.rank == 0 and out:
            raise RuntimeError("file transfer to the run directory failed (the files stay in "
                               "the ranks' run.local_dir): " + "; ".join(out))

    def _drop_report(self):
        rep = self.p2p and self.p2p.watchdog.reporter
        if rep is not None:
            rep.close()
            from .hang import report_path
            report_path(self.base, self.rank).unlink(missing_ok=True)

    # -- failure -------------------------------------------------------------------------------
    def fail(self, exc_type: str, message: str, tb: str, extra: dict | None = None):
        """Say it (a traceback, or one line when `tb` is empty), then record it: meta.json
        first (it must succeed, even on a full disk), then the rank's log and trace."""
        from . import rundir
        problem = None
        if self.base and self.base != self.run_dir:  # room on the local disk, for the log
            rundir.release(self.base, self.rank)
        if self.run_dir:  # first: when the launcher is gone, writing to stderr can kill us
            try:
                rundir.mark_failed(self.run_dir, self.rank, exc_type, message, extra)
            except Exception as e:  # noqa: BLE001 - recording the failure must not mask it
                problem = (f"[rank {self.rank}] could not record the failure in "
                           f"{self.run_dir / 'meta.json'}: {e}\n")
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
        for record in (lambda: self.files and self.files.log(f"FAILED: {message}\n{tb}"),
                       lambda: self.tracer and self.tracer.flush(),
                       self._copy_back):
            try:
                record()
            except Exception:  # noqa: BLE001 - best effort (the disk may be full); meta.json has it
                pass

    @staticmethod
    def abort(code: int):
        """MPI_Abort the job, a moment after this rank's last words: mpiexec kills every process
        at once, and a line still on its way through the launcher's stderr forwarding would be
        lost (seen: a rank's one-line error never reaching the terminal)."""
        from . import comm
        sys.stderr.flush()
        time.sleep(0.3)
        comm.abort(code)

    def dead_peer(self) -> str | None:
        """'died: rank R last seen at step N, T s ago' if another rank's process is gone (its
        heartbeat, harness.heartbeat.judge), else None."""
        from .heartbeat import judge
        if not self.run_dir:
            return None
        peers = {"status": "running", "ranks": [{"rank": r} for r in range(self.size)
                                                if r != self.rank]}
        try:
            return judge(self.run_dir, peers, bases=self.bases)
        except Exception:  # noqa: BLE001 - a judgement we cannot make is no judgement
            return None

    def failed_first(self, e: BaseException) -> str | None:
        """For an MPI error on this rank: 'rank R failed first (Type: message)' when meta.json
        already records another rank's failure (that rank aborted the job, and its exit broke a
        transfer in progress here, e.g. a shared-memory copy from its address space), else None.
        Then the cause is the other rank's, and this rank's traceback would only bury it."""
        from mpi4py import MPI
        if not isinstance(e, MPI.Exception) or not self.run_dir:
            return None
        try:
            err = json.loads((self.run_dir / "meta.json").read_text()).get("error") or {}
        except (OSError, ValueError):
            return None
        if err.get("rank") in (None, self.rank):
            return None
        return f"rank {err['rank']} failed first ({err.get('type')}: {err.get('message')})"

    def _copy_back(self):
        """On a failure, as far as it can: the local files to the run directory through the
        file system, when this rank can reach it (MPI may be unusable by now)."""
        if self.cfg and self.cfg.run.local_dir and self.run_dir and self.base:
            from .localdir import copy_back
            copy_back(self.base, self.run_dir, self.rank)

    def explain_hang(self, trigger: str) -> str | None:
        """Watchdog or SIGUSR1: report what this rank is blocked on, wait for the others'
        reports, and, if this is the lowest rank that asked, print one diagnosis (harness.hang).
        -> the diagnosis, or None when another rank gives it (or there is nothing to report)."""
        from . import hang
        wd = self.p2p.watchdog if self.p2p else None
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
            self.files.log(diag)
        except (OSError, ValueError):
            pass
        return diag

    def on_signal(self, name: str, signum: int):
        """Signal thread (harness.signals): SIGTERM and friends end the run as a failure;
        SIGUSR1 first explains what every rank is blocked on (harness.hang)."""
        diag = self.explain_hang(name) if name == "SIGUSR1" and not self.done else None
        if not self.done:
            # mpirun terminates the survivors when a rank was killed: then name the dead rank
            died = self.dead_peer()
            if died:
                self.fail("Died", f"{died}; the job was then terminated ({name})", "")
            else:
                self.fail("Terminated", f"terminated by {name} {self._when()}", "",
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


def warn_oversubscribed(infos: list) -> None:
    """Once per job (rank 0): hosts running more ranks than they have cores."""
    for host in sorted({i["host"] for i in infos}):
        mine = [i for i in infos if i["host"] == host]
        if len(mine) > mine[0]["cores"]:
            print(f"warning: {len(mine)} ranks on {host}, which has {mine[0]['cores']} cores: "
                  f"oversubscribed, so step times are not representative", file=sys.stderr,
                  flush=True)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "mpi4py", "numpy", "omegaconf", "psutil", "nvidia-ml-py", "mpich"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
