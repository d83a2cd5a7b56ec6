"""Each of a rank's blocks timed alone at set-up, at several microbatch sizes.

What the what-if (analysis/whatif.py) scales a run's measured action times with, so that one
run predicts other microbatch counts (matmuls do not cost in proportion to rows on a CPU:
FIELD.md), other splits, and the zero-bubble schedules' split backward. The run itself measures
its blocks only at its own microbatch size; this adds the shape of each block's cost in rows.

Per block and microbatch size `rows`: the forward, the backward (`y.backward(g)`: input and
weight gradients), and at the run's own size the split backward's two halves as the executor
runs them (harness.core.splitgrad: B = the input gradient, W = the weight gradient). The loss
(on the rank holding the last stage) is timed as one more block, index L. Each time is the
shortest of `repeats` after one warm-up call (timeit's rule: a deterministic computation is
only ever slowed by what else runs; on a host shared with other jobs the median of five still
caught 60-190 ms preemptions in a 1 ms backward), so a cold cache, a first allocation or a
neighbour's burst does not count. The what-if uses these times as ratios between sizes.

The result goes into meta.json `ranks[r].block_times` (docs/run-format.md): measured before
the test knobs (debug.slow_*) slow the blocks down, so it is the blocks' own cost.
"""
from __future__ import annotations

import time

import torch

from ..core.splitgrad import Split
from ..runformat import block_time_rows

REPEATS = 5


def _timed(fn, repeats: int, setup=None, sync=None) -> float:
    """Shortest seconds of fn(setup()) (fn() without setup; setup untimed) over `repeats`
    calls after one warm-up call."""
    ts = []
    sync = sync or (lambda: None)
    for _ in range(repeats + 1):
        arg = setup() if setup else None
        sync()
        t0 = time.perf_counter()
        fn(arg) if setup else fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return min(ts[1:])


def _float_input(x):
    return x.detach().requires_grad_(x.is_floating_point())


def measure(stage, chunk_stages: list, last_stage: int, batch: int, mb_rows: int, device,
            autocast, repeats: int = REPEATS) -> dict:
    """This rank's blocks timed (module docstring) -> meta.json's block_times: {"rows": [...],
    "chunks": [time_chunk's result per chunk of the rank]}. stage: the rank's
    harness.core.stage.Stage; chunk_stages: the global stage of each of its chunks."""
    rows_list = block_time_rows(batch, mb_rows)
    x_all, y_all = stage.data(0)
    k, chunks = 0, []
    for c, (first, end) in enumerate(stage.chunks):
        blocks = list(zip(range(first, end), stage.layers[k:k + end - first]))
        k += end - first
        if chunk_stages[c] == 0:
            def first_input(rows, x=x_all):
                return x[:rows].to(device)
        else:
            shape, dtype = stage.chunk_recv[c]["act"]

            def first_input(rows, shape=tuple(shape), dtype=dtype):
                # its own generator: the global RNG stays as the run would find it
                g = torch.Generator().manual_seed(rows)
                return torch.randn((rows, *shape[1:]), generator=g).to(device, dtype)
        last = chunk_stages[c] == last_stage
        with autocast():
            chunks.append(time_chunk(blocks, first_input, stage.loss if last else None,
                                     y_all.to(device) if last else None, rows_list, mb_rows,
                                     repeats, data_input=chunk_stages[c] == 0,
                                     sync=_sync(device)))
    return {"rows": rows_list, "repeats": repeats, "chunks": chunks}


def _sync(device):
    if getattr(device, "type", "cpu") == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def time_chunk(blocks, first_input, loss=None, targets=None, rows_list=(), split_rows=None,
               repeats: int = REPEATS, data_input: bool = False, sync=None) -> dict:
    """Time one chunk's blocks (a list of (global index, module)) at each rows in rows_list.

    first_input(rows) -> the chunk's input for that many rows; loss(out, targets[:rows]) the
    loss when the chunk ends the model (timed as the block of index last + 1). split_rows: the
    size at which B and W are timed (the run's own). data_input: the first block's input is
    the model's (no gradient wanted, as on stage 0). sync: called before each clock reading
    (a GPU's queue drained). -> {"blocks": [...], "fwd": [[s per rows] per block], "bwd": [...],
    "bwd_in": [s per block], "bwd_w": [...]}."""
    idx = [i for i, _ in blocks] + ([blocks[-1][0] + 1] if loss is not None else [])
    out = {"blocks": idx, "fwd": [[] for _ in idx],
           "bwd": [[] for _ in idx], "bwd_in": [None] * len(idx), "bwd_w": [None] * len(idx)}
    _warm_up(blocks, first_input(split_rows or rows_list[-1]), data_input)
    for rows in rows_list:
        x = first_input(rows)
        for k, (_, blk) in enumerate(blocks):
            xin = x if k == 0 and data_input else _float_input(x)
            y = blk(xin)
            g = torch.ones_like(y)
            out["fwd"][k].append(_timed(lambda: blk(xin), repeats, sync=sync))
            out["bwd"][k].append(_timed(lambda o: o.backward(g), repeats, lambda: blk(xin), sync))
            if rows == split_rows:
                _split_times(out, k, blk, xin, g, repeats, sync)
            blk.zero_grad(set_to_none=True)
            x = y.detach()
        if loss is not None:
            k, t = len(idx) - 1, targets[:rows]
            xin = _float_input(x)
            out["fwd"][k].append(_timed(lambda: loss(xin, t), repeats, sync=sync))
            out["bwd"][k].append(_timed(lambda o: o.backward(), repeats, lambda: loss(xin, t),
                                        sync))
            if rows == split_rows:    # the loss has no weights: its backward is all B
                out["bwd_in"][k], out["bwd_w"][k] = out["bwd"][k][-1], 0.0
    return out


def _warm_up(blocks, x, data_input: bool) -> None:
    """One untimed forward and backward through the chunk: the first calls of a process pay
    for allocations and thread start-up that no later call does."""
    for k, (_, blk) in enumerate(blocks):
        x = blk(x if k == 0 and data_input else _float_input(x))
        x.backward(torch.ones_like(x))
        blk.zero_grad(set_to_none=True)
        x = x.detach()


def _split_times(out: dict, k: int, blk, xin, g, repeats: int, sync=None) -> None:
    """B and W of block k, as harness.core.splitgrad splits them (a block whose input needs no
    gradient, the model's first, leaves everything to W)."""
    params = list(blk.parameters())
    inp = xin if xin.requires_grad else None
    tb, tw = [], []
    sync = sync or (lambda: None)
    for _ in range(repeats + 1):
        s = Split(blk(xin), g, inp, params)
        sync()
        t0 = time.perf_counter()
        s.input_grad()
        sync()
        t1 = time.perf_counter()
        s.weight_grad()
        sync()
        t2 = time.perf_counter()
        tb.append(t1 - t0)
        tw.append(t2 - t1)
    out["bwd_in"][k], out["bwd_w"][k] = min(tb[1:]), min(tw[1:])
