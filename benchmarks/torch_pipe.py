"""The same model, split the same way, trained with torch.distributed.pipelining (the peer).

Launched by benchmarks/schedules.py as `torchrun --nproc-per-node P -m benchmarks.torch_pipe
SCHEDULE M STEPS OUT.json key=value...` (gloo on CPU). Builds each stage with harness.core.stage
(same blocks, init, data, split and thread count as our runs, for the MLP, the GPT or a factory
model), runs PyTorch's class for our schedule (PEER below), then the optimizer and the gradient and
update norms our runs record every step (the same work per step on both sides), and writes
per-step wall times (max over ranks) and the losses to OUT.json from rank 0.

Virtual stages: a rank's chunks become one PipelineStage each, numbered by our placement
(harness.schedule.Placement: loop for interleaved, V for zbv and dualpipev — PyTorch's "loop"/"v" mapping), so
both sides hold the same blocks on the same rank (harness.torchpipe.worker.torch_schedule, which
`harness.run runtime=torch` builds its runs with; this one records only step times and losses).
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from harness import config
from harness.core.executor import step_norms
from harness.core.stage import build as build_stage
from harness.ops import malloc
# our schedule -> PyTorch's class, and the classes that take a list of stages (harness.torchpipe)
from harness.torchpipe.build import MULTI, PEER, torch_schedule  # noqa: F401


def main(schedule: str, m: int, steps: int, out: str, overrides: list[str]):
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    # our config for the same case: its schedule and m fix the placement and microbatch size
    cfg, ours = config.load_with_schedule(
        [*overrides, f"schedule={schedule}", f"pipeline.microbatches={m}"], world_size=size)
    torch.set_num_threads(cfg.threads or max(1, config.cores_available() // size))
    malloc.apply(cfg.malloc)   # the allocator policy ours runs under (harness/ops/malloc.py)
    # the same stage as ours (harness.core.stage: any model, same split, init and data)
    pl = ours.placement
    st = build_stage(cfg, rank, pl, cfg.data.batch_size // m)
    sched, _ = torch_schedule(schedule, st, pl, rank, m)
    first_rank, last_rank = pl.where(0)[0], pl.where(pl.stages - 1)[0]
    params = list(st.layers.parameters())
    opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum)
    times, losses = [], []
    for step in range(steps):
        x, y = st.data(step)
        dist.barrier()
        t0 = time.perf_counter()
        mb_losses = []
        kw = {"target": y, "losses": mb_losses} if rank == last_rank else {}
        sched.step(*([x] if rank == first_rank else []), **kw)
        if rank == last_rank:
            losses.append(float(torch.stack(mb_losses).detach().mean()))
        opt.step()
        # the statistics our runs record every step, so that both sides do the same work
        step_norms(params, opt, cfg.train.lr, cfg.train.momentum)
        opt.zero_grad(set_to_none=True)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    last_losses = [None]
    if size > 1:
        obj = [losses]
        dist.broadcast_object_list(obj, src=last_rank)
        last_losses = obj[0]
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"schedule": schedule, "microbatches": m, "ranks": size,
                       "step_times": times, "losses": last_losses}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
