"""Set-up block times (harness/trace/blocktime.py): what meta.json's ranks[r].block_times holds."""
from __future__ import annotations

import contextlib

import torch

from harness import config, runformat
from harness.core import stage
from harness.trace import blocktime


def test_rows_timed_are_the_batch_fractions_and_the_runs_own():
    assert runformat.block_time_rows(256, 32) == [16, 32, 64, 128, 256]
    assert runformat.block_time_rows(48, 12) == [3, 6, 12, 24, 48]
    assert runformat.block_time_rows(8, 8) == [1, 2, 4, 8]


def _stage(rank, *args):
    cfg, sched = config.load_with_schedule(
        ["model.layers=4", "model.width=32", "model.in_features=16", "data.batch_size=16",
         "schedule=1f1b", "pipeline.microbatches=2", *args], world_size=2)
    pl = sched.placement
    return stage.build(cfg, rank, pl, 8), [pl.stage(rank, c) for c in range(pl.v)], pl


def test_each_block_and_the_loss_timed_at_every_size():
    torch.set_num_threads(1)
    out = {}
    for r in (0, 1):
        st, gs, pl = _stage(r)
        out[r] = blocktime.measure(st, gs, pl.stages - 1, 16, 8, torch.device("cpu"),
                                   contextlib.nullcontext, repeats=1)
    assert out[0]["rows"] == [1, 2, 4, 8, 16] and out[0]["repeats"] == 1
    first, last = out[0]["chunks"][0], out[1]["chunks"][0]
    assert first["blocks"] == [0, 1] and last["blocks"] == [2, 3, 4]    # 4: the loss
    for c in (first, last):
        for k in ("fwd", "bwd"):
            assert all(len(v) == 5 and all(t > 0 for t in v) for v in c[k])
        assert all(t is not None and t >= 0 for t in c["bwd_in"] + c["bwd_w"])
    # the model's first block: its input is data, so B has nothing to do and W does it all;
    # the loss has no weights: all its backward is B
    assert first["bwd_in"][0] < first["bwd_w"][0]
    assert last["bwd_w"][-1] == 0.0 and last["bwd_in"][-1] > 0


def test_measuring_leaves_no_gradient_and_the_global_rng_alone():
    st, gs, pl = _stage(1)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    blocktime.measure(st, gs, pl.stages - 1, 16, 8, torch.device("cpu"),
                      contextlib.nullcontext, repeats=1)
    assert torch.rand(1) == before
    assert all(p.grad is None for p in st.layers.parameters())
