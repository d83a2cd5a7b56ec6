"""One rank of torch.distributed.pipelining on our stages: the worker `harness.run
runtime=torch` trains with under torchrun.

The same parts as our worker (harness.worker: allocator policy, threads, the stage built from
the config, clocks, trace files, memory sampler, watchdog, Kineto window) around PyTorch's
executor instead of ours: PyTorch's class for our schedule, built on the rank's chunks
(harness.torchpipe.build), recorded by the Probe. Per step: the
batch (the same data as ours), `schedule.step()`, then the optimizer and the gradient and
update norms our runs compute (`opt`, `norms` spans), so both runtimes do the same work.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import schedule as S
from ..core.executor import step_norms
from ..ops import debug_knobs
from ..worker import Worker
from . import plan
from .build import torch_schedule
from .probe import NoProbe, Probe


class TorchWorker(Worker):
    """Rank `rank`'s PyTorch pipeline (Worker's interface, for harness.train.Run). comm: the
    job's collectives (harness.torchpipe.dist.DistComm). `schedule` becomes PyTorch's plan
    (harness.torchpipe.plan), which is what the run directory records as planned."""

    def __init__(self, cfg, schedule: S.Schedule, rank: int, on_timeout, comm):
        self.comm = comm
        super().__init__(cfg, schedule, rank, on_timeout)

    def open(self, base) -> None:
        """Collective: this rank's stage, PyTorch's schedule on it, the optimizer and the trace
        (into base), the probe that records PyTorch's actions."""
        cfg, rank, schedule = self.cfg, self.rank, self.schedule
        device = torch.device("cpu")   # gloo's CPU tensors (config refuses device=cuda)
        self.cuda_aware = False
        pl, m = schedule.placement, cfg.pipeline.microbatches
        st = self._stage(device)
        self.sched, blocks = torch_schedule(cfg.schedule, st, pl, rank, m, device)
        self.first, self.last = 0 in blocks, pl.stages - 1 in blocks
        self.params = list(st.layers.parameters())
        self.opt = torch.optim.SGD(self.params, lr=cfg.train.lr, momentum=cfg.train.momentum)
        tracker, timer, mem_status = self._trace(base, self.params, device)
        # trace.enabled=false: PyTorch's objects as they are, nothing wrapped (the baseline)
        self.probe = (Probe(self.sched, self.tracer, tracker, self.clock.now, blocks,
                            st.n_blocks, st.names, self.watchdog, cfg.comm.timeout_s)
                      if cfg.trace.enabled else NoProbe())
        self.schedule = plan.from_torch(self.sched, cfg.schedule)
        # the step-level test knobs (debug.fail_*, debug.stall_*) wrap it from outside
        steps = SimpleNamespace(run_step=self.torch_step, actions=self.schedule[rank])
        self.run_step = debug_knobs.wrap(steps, cfg.debug, rank).run_step
        cls = type(self.sched).__name__
        self.runtime = {"name": "torch", "class": cls, "torch": torch.__version__,
                        "backend": "gloo", "launcher": "torchrun"}
        self.info, self.summary = self._describe(base, device, timer, mem_status,
                                                 f"PyTorch's {cls} on gloo")

    def torch_step(self, step: int, actions=None) -> dict:
        """One training step: PyTorch's schedule.step() on the step's batch, then the optimizer
        and the statistics -> {loss, grad_norm, update_norm} (loss: the last stage's)."""
        tr = self.tracer
        tr.begin_step()
        m0 = tr.mark()
        x, y = self.stage.data(step)
        losses = []
        self.probe.begin(step)
        try:
            self.sched.step(*([x] if self.first else []),
                            **({"target": y, "losses": losses} if self.last else {}))
        finally:
            self.probe.end()
        del x, y
        m1 = tr.mark()
        self.opt.step()
        m2 = tr.mark()
        tr.span(step, -1, -1, "opt", m1, m2)
        gnorm, unorm = step_norms(self.params, self.opt, self.cfg.train.lr,
                                  self.cfg.train.momentum)
        tr.span(step, -1, -1, "norms", m2, tr.mark())
        self.opt.zero_grad(set_to_none=True)
        tr.span(step, -1, -1, "step", m0, tr.mark())
        # PyTorch's losses are each microbatch's mean: their mean is the batch's
        loss = float(torch.stack(losses).detach().double().mean()) if self.last else None
        return {"loss": loss, "grad_norm": gnorm, "update_norm": unorm}
