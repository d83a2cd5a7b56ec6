"""PyTorch's schedule class for each of ours, built on the chunks of our stage.

Each of a rank's chunks becomes one `PipelineStage` (its blocks in an `nn.Sequential`), numbered
by our placement (harness.schedule.Placement: loop, or V for zbv and dualpipev), which is how
PyTorch's "loop" and "v" mappings number them, so both runtimes hold the same blocks on the same
rank; the schedule gets our loss per microbatch and scales the gradients by 1/m itself.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV,
                                           ScheduleGPipe, ScheduleInterleaved1F1B,
                                           ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

# our schedule -> PyTorch's class. naive is GPipe with m = 1; zb_h1 is the zero-bubble paper's
# ZB-H1, which PyTorch runs as ScheduleInterleavedZeroBubble (the paper's ZB1P) with one stage
# per rank: the same F, I and W in the same order on every rank (tests/test_schedule_peer.py).
PEER = {"naive": ScheduleGPipe, "gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
        "interleaved": ScheduleInterleaved1F1B, "zb_h1": ScheduleInterleavedZeroBubble,
        "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
MULTI = {"interleaved", "zb_h1", "zbv", "dualpipev"}   # PipelineScheduleMulti: a list of stages


def torch_schedule(name: str, st, placement, rank: int, m: int, device=torch.device("cpu")):
    """PyTorch's schedule class for our schedule `name`, built on the chunks of stage `st`
    (harness.core.stage) of `rank` -> (schedule, {stage index: [(block index, module)]})."""
    blocks, stages, k = {}, [], 0
    for c, (first, end) in enumerate(st.chunks):   # st.layers: all chunks' blocks, in order
        mods = list(st.layers[k:k + end - first])
        k += end - first
        g = placement.stage(rank, c)
        blocks[g] = list(zip(range(first, end), mods))
        stages.append(PipelineStage(nn.Sequential(*mods), g, placement.stages, device))
    # one loss per microbatch; the schedule scales gradients by 1/m (scale_grads=True)
    sched = PEER[name](stages if name in MULTI else stages[0], n_microbatches=m,
                       loss_fn=st.loss)
    return sched, blocks
