"""Entry point: `[mpirun -n P] python -m harness.run [exp=NAME] [key=value ...]`.

One process per pipeline stage. The order matters: the config is validated before any MPI
communication; then rank 0 creates the run directory and shares it; then every rank builds its
stage, writes its traces and stats while training, and rank 0 marks the run complete only after
every rank has finished. An exception on any rank is printed once (by that rank), recorded in
meta.json and brings the whole job down with MPI_Abort, so no rank is left blocked in a receive
(harness/failure.py: the failure half of Run).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path

from . import config
from .failure import Diverged, Failures, Stopped  # noqa: F401 - Stopped: raised here


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
    alone = unjoined(size)
    if alone:  # every task is rank 0 of its own world: the first task says it
        if os.environ.get("SLURM_PROCID", "0") == "0":
            print(f"harness.run: error: {alone}", file=sys.stderr, flush=True)
        return 2
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


class Run(Failures):
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
            return self.on_exception(e)

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
        host = socket.gethostname()
        self.base = localdir.base_dir(self.cfg.run.local_dir, self.run_path, self.run_path.name,
                                      self.rank, host)
        # without run.local_dir every rank writes into the run directory rank 0 created: a rank
        # on a host that does not share its file system must say so, not create one of its own
        blind = (self.rank != 0 and self.run_dir is not None and not self.cfg.run.local_dir
                 and not sees_dir(self.run_path))
        views = comm.allgather((str(self.base), host, blind))
        if any(b for _, _, b in views):
            if self.rank == 0:
                print(f"harness.run: error: {unreachable(views, self.run_path)}", file=sys.stderr,
                      flush=True)
                if self.cfg.run.dir is None:  # the default name was made for this run: empty
                    with contextlib.suppress(OSError):
                        self.run_path.rmdir()
            return False
        (self.base / "ranks").mkdir(parents=True, exist_ok=True)
        self.bases = [Path(b) for b, _, _ in views]
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
        from .malloc import apply as malloc_policy
        self.malloc = malloc_policy(cfg.malloc)   # before the model's tensors come and go
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
                "cores": config.cores_available(), "threads": threads, "malloc": self.malloc,
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
                         "detach": cfg.pipeline.detach,
                         "recompute": cfg.pipeline.recompute},
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


def sees_dir(path: Path, wait_s: float = 2.0) -> bool:
    """Whether this rank sees the directory rank 0 created. Listing the parent first makes an
    NFS client revalidate its cached view of it; a short wait allows for a slower one."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            os.listdir(path.absolute().parent)
        if path.is_dir():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def unreachable(views: list, run_path: Path) -> str:
    """One line naming the ranks that cannot see the run directory (views: (base, host, blind)
    per rank, rank 0 first)."""
    blind = [(r, h) for r, (_, h, b) in enumerate(views) if b]
    hosts = sorted({h for _, h in blind})
    h0 = views[0][1]
    return (f"rank{'s' if len(blind) > 1 else ''} {', '.join(str(r) for r, _ in blind)} on "
            f"{', '.join(hosts)} cannot write into the run directory {run_path.absolute()} that "
            f"rank 0 created on {h0}: {' and '.join(hosts)} "
            f"{'does' if len(hosts) == 1 else 'do'} not have it (no file system shared with {h0} "
            f"there); set run.local_dir to a directory every host has (e.g. "
            f"run.local_dir=/tmp/$USER), or run.dir on a file system all hosts share")


def unjoined(size: int) -> str | None:
    """srun started several tasks but MPI made each a world of its own (no PMI joined them):
    each would train alone. None when that is not the case."""
    n = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if size != 1 or not n.isdigit() or int(n) < 2:
        return None
    return (f"srun started {n} tasks but MPI sees a world of 1 in each (Slurm's PMI did not "
            f"join them): use srun --mpi=pmi2 (PyPI's MPICH speaks it), or mpirun inside "
            f"salloc/sbatch")


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
