"""The same model, split the same way, trained with torch.distributed.pipelining (the peer).

Launched by benchmarks/schedules.py as `torchrun --nproc-per-node P -m benchmarks.torch_pipe
SCHEDULE M STEPS OUT.json key=value...` (gloo on CPU). Builds each stage with harness.core.stage
(same blocks, init, data, split and thread count as our runs, for the MLP, the GPT or a factory
model), runs PyTorch's class for our schedule (PEER below), then the optimizer and the gradient and
update norms our runs record every step (the same work per step on both sides), and writes
per-step wall times (max over ranks) and the losses to OUT.json from rank 0.

Virtual stages: a rank's chunks become one PipelineStage each, numbered by our placement
(harness.schedule.Placement: loop for interleaved, V for zbv and dualpipev — PyTorch's "loop"/"v" mapping), so
both sides hold the same blocks on the same rank.
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                           ScheduleDualPipeV, ScheduleInterleaved1F1B,
                                           ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

from harness import config
from harness.core.executor import step_norms
from harness.core.stage import build as build_stage
from harness.ops import malloc

# our schedule -> PyTorch's class. zb_h1 is the zero-bubble paper's ZB-H1, which PyTorch runs as
# ScheduleInterleavedZeroBubble (the paper's ZB1P) with one stage per rank: the same F, B and W
# in the same order on every rank (tests/test_schedule_peer.py), as for the other MULTI classes.
PEER = {"gpipe": ScheduleGPipe, "naive": ScheduleGPipe, "1f1b": Schedule1F1B,
        "interleaved": ScheduleInterleaved1F1B, "zb_h1": ScheduleInterleavedZeroBubble,
        "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
MULTI = {"interleaved", "zb_h1", "zbv", "dualpipev"}   # PipelineScheduleMulti: a list of stages


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
    n_stages = pl.p * pl.v
    mods, stages, i = [], [], 0
    for c, (first, end) in enumerate(st.chunks):   # st.layers: all chunks' blocks, in order
        mods.append(torch.nn.Sequential(*st.layers[i:i + end - first]))
        i += end - first
        stages.append(PipelineStage(mods[-1], pl.stage(rank, c), n_stages, torch.device("cpu")))
    first_rank, last_rank = pl.where(0)[0], pl.where(n_stages - 1)[0]
    # loss per microbatch; the schedule scales gradients by 1/m (scale_grads=True)
    if schedule in MULTI:
        sched = PEER[schedule](stages, n_microbatches=m, loss_fn=st.loss)
    else:
        sched = PEER[schedule](stages[0], n_microbatches=m, loss_fn=st.loss)
    params = [q for mod in mods for q in mod.parameters()]
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
