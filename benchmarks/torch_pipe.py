"""The same model, split the same way, trained with torch.distributed.pipelining (the peer).

Launched by benchmarks/schedules.py as `torchrun --nproc-per-node P -m benchmarks.torch_pipe
SCHEDULE M STEPS OUT.json key=value...` (gloo on CPU). Builds each stage with harness.stage (same
blocks, init, data, split and thread count as our runs, for the MLP, the GPT or a factory model), runs ScheduleGPipe or Schedule1F1B,
and writes per-step wall times (max over ranks) to OUT.json from rank 0.
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from harness import config
from harness.stage import build as build_stage


def main(schedule: str, m: int, steps: int, out: str, overrides: list[str]):
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    cfg = config.load(overrides, world_size=size)
    torch.set_num_threads(cfg.threads or max(1, config.cores_available() // size))
    # the same stage as ours (harness.stage: any model, same split, init and data)
    st = build_stage(cfg, rank, size, cfg.data.batch_size // m)
    stage_mod = torch.nn.Sequential(*st.layers)
    stage = PipelineStage(stage_mod, rank, size, torch.device("cpu"))
    # loss per microbatch; the schedule scales gradients by 1/m (scale_grads=True)
    sched_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = sched_cls(stage, n_microbatches=m, loss_fn=st.loss)
    opt = torch.optim.SGD(stage_mod.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    times, losses = [], []
    for step in range(steps):
        x, y = st.data(step)
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            sched.step(x)
        elif rank == size - 1:
            mb_losses = []
            sched.step(target=y, losses=mb_losses)
            losses.append(float(torch.stack(mb_losses).mean()))
        else:
            sched.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    last_losses = [None]
    if size > 1:
        obj = [losses]
        dist.broadcast_object_list(obj, src=size - 1)
        last_losses = obj[0]
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"schedule": schedule, "microbatches": m, "ranks": size,
                       "step_times": times, "losses": last_losses}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
