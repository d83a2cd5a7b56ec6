"""One rank's working parts, built from the config: what `harness.train.Run` trains with.

Set-up, in order: the allocator policy (before the model's tensors come and go), threads, the
whole model built and checked on every rank (refused once, before the run directory exists, if
it fails the harness's checks, raises, or differs between ranks); then the device, this rank's
stage of the model (harness.core.stage) with the test knobs that slow it down, the optimizer,
the clocks and the trace (harness.trace), the transport under its watchdog (harness.core.comm,
harness.ops.watchdog), the optional Kineto window, and the executor (harness.core.executor)
wrapped in the step-level test knobs (harness.ops.debug_knobs). meta.json records each block's
digest (model.digests).
"""
from __future__ import annotations

import gc
import os
import socket
import sys
import time

import torch

from . import config
from . import schedule as S
from .core import comm, stage
from .core.executor import StageExecutor
from .core.sgd import SGD
from .models.base import ModelError, UserCodeError, set_recompute_observer
from .models.digest import METHOD, first_difference
from .ops import debug_knobs, malloc
from .ops.watchdog import Watchdog
from .runformat import weights_file
from .trace import blocktime
from .trace import clock as tclock
from .trace import open_trace
from .trace.kineto import KinetoWindow


class Worker:
    """Rank `rank`'s stage, optimizer, trace, transport and executor for `schedule` (the run's
    one Schedule). on_timeout(what): called by the watchdog thread when a blocking call outlives
    comm.timeout_s.

    Two phases. Constructing it is collective and writes no file: the process (allocator,
    threads) and the whole model, built and checked on every rank (`agreed_model`);
    `model` is None when the model was refused (said once). `open(base)` builds the rest, where
    base is where this rank writes its files. PyTorch's pipeline (harness.torchpipe.worker)
    runs on the same parts with another `open`."""

    comm = comm          # the job's collectives (harness.core.comm: MPI)
    runtime = {"name": "ours"}   # meta.json "runtime": which executor ran the schedule
    freeze_setup = True  # start() freezes the set-up's objects (harness.batch: False)

    def __init__(self, cfg, schedule: S.Schedule, rank: int, on_timeout):
        self.cfg, self.schedule, self.rank, self.on_timeout = cfg, schedule, rank, on_timeout
        self.malloc = malloc.apply(cfg.malloc)   # before the model's tensors come and go
        self.local_rank, self.local_size = self.comm.local_rank_size()
        self.threads = cfg.threads or max(1, config.cores_available() // self.local_size)
        torch.set_num_threads(self.threads)
        self.mb_rows = cfg.data.batch_size // cfg.pipeline.microbatches
        self.model = agreed_model(cfg, schedule.placement.stages, self.mb_rows, rank, self.comm)

    def open(self, base) -> None:
        """Collective: this rank's stage, optimizer, trace (into base), transport, executor."""
        cfg, schedule, rank = self.cfg, self.schedule, self.rank
        local_rank = self.local_rank
        if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
            device = torch.device("cpu")
        else:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        cuda_aware = (comm.mpi_takes_cuda() if cfg.comm.cuda_aware == "auto"
                      else cfg.comm.cuda_aware == "true") and device.type == "cuda"
        self.cuda_aware = cuda_aware

        st = self._stage(device)
        layers = st.layers
        opt = SGD(layers.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)

        tracker, timer, mem_status = self._trace(base, layers.parameters(), device)
        p2p = comm.P2P(self.tracer, self.clock.now, self.watchdog, device, cuda_aware,
                       cfg.comm.wait, cfg.comm.poll_us, cfg.comm.spin_us)
        self.executor = StageExecutor(
            st, schedule, rank, p2p=p2p, tracer=self.tracer, tracker=tracker, optimizer=opt,
            device=device, pipeline=cfg.pipeline, train=cfg.train, trace=cfg.trace,
            where=self.watchdog.where, autocast=lambda: stage.autocast(cfg, device.type))
        self.run_step = debug_knobs.wrap(self.executor, cfg.debug, rank).run_step
        self.info, self.summary = self._describe(base, device, timer, mem_status,
                                                 f"cuda-aware MPI {cuda_aware}")

    # -- the parts every runtime's worker sets up the same way ---------------------------------
    def _stage(self, device):
        """Collective: this rank's stage of the agreed model on `device`, its boundary tensors
        checked against the other ranks', its blocks' digests recorded and timed alone
        (set-up block times), then the test knobs that slow it down (debug.slow_*, no-op by
        default) -> the stage (also self.stage)."""
        cfg, comm = self.cfg, self.comm
        self.stage = st = stage.build(cfg, self.rank, self.schedule.placement, self.mb_rows,
                                      agree=comm.bcast, model=self.model)
        check_boundaries(st, comm)
        st.info["digests"] = digest_record(st, self.model, comm)
        st.layers.to(device)
        self.block_times = self._block_times(st, device)
        debug_knobs.apply(cfg.debug, self.rank, st.layers)
        return st

    def _block_times(self, st, device):
        """The blocks' own cost at several microbatch sizes (what the what-if scales with),
        timed before the test knobs slow them down (harness.trace.blocktime), or None."""
        cfg, pl = self.cfg, self.schedule.placement
        if not (cfg.trace.enabled and cfg.trace.block_times):
            return None
        return blocktime.measure(
            st, [pl.stage(self.rank, c) for c in range(pl.v)], pl.stages - 1,
            cfg.data.batch_size, self.mb_rows, device, lambda: stage.autocast(cfg, device.type),
            cfg.trace.block_repeats)

    def _trace(self, base, params, device):
        """The clock (debug.clock_* skews it), timer, trace files, memory sampler, watchdog and
        Kineto window of this rank -> (pebble tracker, timer, memory sources' status)."""
        cfg, d = self.cfg, self.cfg.debug
        skewed = d.clock_rank == self.rank
        self.clock = tclock.Clock(int(d.clock_offset_ms * 1e6) if skewed else 0,
                                  d.clock_drift_ppm if skewed else 0.0)
        timer = (tclock.CudaTimer(self.clock, device) if device.type == "cuda"
                 else tclock.HostTimer(self.clock))
        tracker, self.tracer, self.sampler, mem_status = open_trace(
            cfg.trace.enabled, base, self.rank, timer, self.clock.now, params, device,
            cfg.trace.sample_interval_ms / 1000)
        self.watchdog = Watchdog(cfg.comm.timeout_s, self.on_timeout)
        self.watchdog.start()
        self.kineto = (KinetoWindow(config.parse_steps(cfg.trace.kineto), base, self.rank, device,
                                    self.clock.now) if cfg.trace.kineto else None)
        self.thread_error = None
        self.clock_start = None
        return tracker, timer, mem_status

    def _describe(self, base, device, timer, mem_status, transport: str):
        """-> (meta.json's entry for this rank, the one-line summary it logs); transport: how
        its messages move, as the summary says it."""
        cfg, d, st, sched = self.cfg, self.cfg.debug, self.stage, self.schedule
        skewed = d.clock_rank == self.rank
        threads = self.threads
        info = {
            "rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
            "device": str(device), "local_rank": self.local_rank, "local_size": self.local_size,
            "cores": config.cores_available(), "threads": threads, "malloc": self.malloc,
            "timer": timer.kind if cfg.trace.enabled else None, "memory_sources": mem_status,
            # where this rank wrote its files, when not in the run directory (run.local_dir)
            "local_dir": str(base) if cfg.run.local_dir else None,
            # the test knob's parameters, so a test can compute the true offset it injected
            "clock_knob": ({"offset_ns": self.clock.skew_ns, "drift_ppm": d.clock_drift_ppm,
                            "origin_ns": self.clock.origin} if skewed else None),
            "block_times": self.block_times}
        summary = (f"rank {self.rank}/{len(sched)} on {info['host']} pid {info['pid']}: "
                   f"{device}, {threads} threads, layers "
                   f"{' '.join(f'{a}..{b - 1}' for a, b in st.chunks)}, "
                   f"schedule {sched.name} m={sched.microbatches}, {transport}, "
                   f"memory sources {mem_status}")
        return info, summary

    def start(self) -> None:
        """Collective, right before the first step: the set-up's objects frozen out of the
        garbage collector's reach, the clocks' offsets to rank 0, then memory sampling.

        torch's import and the set-up leave ~2.5 x 10^5 Python objects; a full collection walks
        them all (~0.13 s here) at an allocation count it picks, in the middle of some step: one step
        in a short run then measured 20-50 times its neighbours. gc.freeze() moves them to a
        generation the collector never scans, so a collection during training walks only what
        training made (CPython's own advice for long-lived processes).

        In a batch (harness.batch) what outlives a run, the imports, is frozen between runs
        instead, and a run's own objects stay collectable (freeze_setup False): they hold its
        model in cycles (hooks, bound methods), so frozen they could only be collected after
        gc.unfreeze(), which would put the imports back into every later run's collection
        (0.1-0.15 s per run and rank)."""
        gc.collect()
        if self.freeze_setup:
            gc.freeze()
        self.clock_start = self.comm.clock_offsets(self.clock.now, self.cfg.trace.clock_exchanges)
        if self.sampler:
            self.sampler.write_rows = self._kept_errors(self.sampler.write_rows)
            self.sampler.start()

    def step(self, step: int) -> tuple[dict, float]:
        """One training step -> ({loss, grad_norm, update_norm}, seconds)."""
        self.watchdog.where.at(step, None)
        if self.kineto:
            self.kineto.before(step)
        t0 = time.perf_counter()
        out = self.run_step(step)
        dt = time.perf_counter() - t0
        self.tracer.flush()
        if self.kineto:
            self.kineto.after(step)
        return out, dt

    def check_threads(self) -> None:
        """Raise what a background thread could not (the sampler's write on a full disk)."""
        if self.thread_error:
            raise self.thread_error

    def _kept_errors(self, write):
        """The sampler thread's writes: an OSError (a full disk) is raised by the main thread
        after the step, through the failure path, instead of killing the thread."""
        def guarded(rows):
            try:
                write(rows)
            except OSError as e:
                self.thread_error = self.thread_error or e
        return guarded

    def save_weights(self, base) -> None:
        """run.save_weights: this rank's blocks' final weights, keyed by global block index."""
        st = self.stage
        state = {gi: {k: v.detach().cpu() for k, v in blk.state_dict().items()}
                 for gi, blk in zip((i for b in st.chunks for i in range(*b)), st.layers)}
        torch.save(state, base / weights_file(self.rank))

    def clock_offsets(self):
        """Collective: the clocks' offsets to rank 0 again (at the end)."""
        return self.comm.clock_offsets(self.clock.now, self.cfg.trace.clock_exchanges)

    def close(self) -> None:
        if self.sampler:
            self.sampler.stop()
        if self.kineto:
            self.kineto.close()  # a window that runs past the last step
        self.tracer.close()
        self.watchdog.stop()
        # the executor's recomputation observer is process-wide (harness.models.base): the
        # next run of a batch (harness.batch) must not time its set-up into this run's trace
        set_recompute_observer(None)
        if self.freeze_setup:
            gc.unfreeze()


def check_boundaries(st, comm=comm) -> None:
    """Every rank probed the boundary shapes itself; they must agree before the first step
    (a model whose blocks depend on something rank-local would otherwise hang or garble).
    comm: the job's collectives."""
    views = comm.allgather(st.boundary)
    bad = [r for r, v in enumerate(views) if v != views[0]]
    if bad:
        raise ValueError(f"ranks disagree on the model's boundary tensors: rank 0 "
                         f"{views[0]}, rank {bad[0]} {views[bad[0]]}")


def agreed_model(cfg, stages: int, mb_rows: int, rank: int, comm=comm) -> stage.Model | None:
    """Collective, before the run directory exists: every rank builds and checks the whole
    model (harness.core.stage.prepare), then the ranks agree on one verdict, so a refusal is
    said once, by the lowest rank that found it, and no rank goes on. None when refused: a
    check of the harness failed (one line), the user's code raised (its traceback), or the
    ranks built different initial weights (the first block that differs)."""
    model, error = None, None
    try:
        model = stage.prepare(cfg, stages, mb_rows)
    except (ModelError, UserCodeError) as e:
        error = str(e)
    views = comm.allgather((error, model.digests if model else None))
    failed = [r for r, (e, _) in enumerate(views) if e]
    if failed:
        verdict, speaker = views[failed[0]][0], failed[0]
    else:
        verdict, speaker = (first_difference([d for _, d in views], model.bm.names)
                            if model.digests else None), 0
    if verdict and rank == speaker:
        print(f"harness.run: error: {verdict}", file=sys.stderr, flush=True)
    return None if verdict else model


def digest_record(st, model: stage.Model, comm=comm) -> dict:
    """Collective: meta.json's model.digests (docs/run-format.md): every block's digest and
    whether the ranks compared them (agreed_model did, for a model every rank built whole)."""
    if model.digests:
        return {"method": METHOD, "blocks": model.digests, "compared": True, "note": None}
    held = {}
    for part in comm.allgather(st.digests):
        held.update(part)
    return {"method": METHOD, "blocks": [held[i] for i in sorted(held)], "compared": False,
            "note": "not possible: each rank builds only its own blocks of the built-in MLP"}
