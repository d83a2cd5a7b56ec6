"""One rank's run: a short training loop over three parts.

- a session (harness.ops.session): the run directory and this rank's files;
- a failure policy (harness.ops.failure): what happens when anything goes wrong, on any thread;
- a worker (harness.worker): this rank's stage, trace, transport and executor.

Which collectives the job uses (MPI's, harness.core.comm; or torch.distributed's under torchrun,
harness.torchpipe.dist), which worker runs the steps (ours, or PyTorch's pipeline:
harness.torchpipe.worker) and which failure policy ends the job are the Run's parts to choose;
the loop is the same.

The order matters: every rank builds and checks the whole model (a model refused is said
once, before any file is written); rank 0 creates the run directory and shares it; every rank
builds its stage, writes its traces and stats while training, and rank 0 marks the run complete
only after every rank has finished. An exception on any rank is printed once (by that rank),
recorded in meta.json and brings the whole job down with MPI_Abort, so no rank is left blocked
in a receive.
"""
from __future__ import annotations

from . import schedule as S
from .core import comm
from .ops import signals
from .ops.failure import FailurePolicy
from .ops.session import Session
from .worker import Worker


class Run:
    """Rank `rank` of `size` training `schedule` (the run's one Schedule) as `cfg` says.
    comm: the job's collectives (default MPI's); worker(cfg, schedule, rank, on_timeout):
    builds the rank's worker (harness.worker.Worker's interface; its `schedule` is what the run
    records as planned); policy: the FailurePolicy class."""

    def __init__(self, cfg, schedule: S.Schedule, rank: int, size: int, comm=comm,
                 worker=Worker, policy=FailurePolicy):
        self.cfg, self.schedule, self.rank, self.size = cfg, schedule, rank, size
        self.comm, self.make_worker = comm, worker
        self.session = Session(cfg, rank, size, comm)
        self.failure = policy(cfg, rank, size, self.session, comm)
        self.worker = None

    def main(self, catch_signals: bool = True) -> int:
        if catch_signals:
            signals.Catcher(self.failure.on_signal).start()
        try:
            # the process and the whole model, checked on every rank before the run directory
            # exists: a model refused is said once, like a bad configuration
            self.worker = self.make_worker(self.cfg, self.schedule, self.rank,
                                           self.failure.on_timeout)
            if self.worker.model is None:
                return 2
            if not self.session.open():
                return 2
            self.setup()
            self.train()
            self.finish()
            return 0
        except BaseException as e:  # noqa: BLE001 - whatever it is, the job must come down
            return self.failure.on_exception(e)

    def setup(self):
        w = self.worker
        w.open(self.session.base)
        self.schedule = w.schedule   # PyTorch's own plan, when PyTorch's pipeline runs it
        self.failure.watch(w.watchdog, w.tracer)
        self.session.files.log(w.summary)
        self.session.start(self.schedule, w.stage, w.info, w.cuda_aware, w.runtime)
        w.start()

    def train(self):
        w, session, failure = self.worker, self.session, self.failure
        for step in range(self.cfg.train.steps):
            failure.step = step
            out, dt = w.step(step)
            session.record(step, out, dt)
            w.check_threads()
            session.say_loss(step, out, dt)
            failure.check_finite(step, out)

    def finish(self):
        w, session = self.worker, self.session
        if self.cfg.run.save_weights:
            w.save_weights(session.base)
        clock_end = w.clock_offsets()
        nonfinite = self.failure.nonfinite_everywhere()
        w.close()
        session.complete(w.clock_start, clock_end, nonfinite)
        self.failure.done = True
        self.comm.barrier()  # meta.json says complete before anyone says the run is done
        self.failure.close()
        session.close()
        if self.rank == self.size - 1:
            print(session.run_path, flush=True)
