"""One rank's stage of any block model: its blocks, loss, data, what it receives, and theory.

`build(cfg, rank, placement, mb_rows)` is where the config's model (`model.name=mlp|gpt` or
`model.factory=package.module:function`) becomes what the executor runs. Every model is a list of
blocks (harness.models.BlockModel); the partition balances parameters (`pipeline.balance=params`)
or the blocks' measured forward+backward time (`time`), and the tensors that cross each stage
boundary are probed from the model once (shapes and dtypes), so receive buffers never come from
hand-written config.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import BlockModel, load_factory, param_counts, probe_shapes
from ..models import gpt as gpt_mod
from ..models import gpt_memory
from ..models import mlp
from ..models.base import ModelError, UserCodeError
from ..models.digest import block_digest


@dataclass
class Stage:
    layers: nn.ModuleList                 # this rank's blocks
    bounds: list                          # [(first, end)] per rank, end exclusive
    costs: list                           # per block: parameters (what the default split balances)
    n_blocks: int
    names: list                           # one name per block
    loss: Callable                        # (output, targets) -> mean loss
    data: Callable                        # step -> (inputs, targets), full batch
    recv: dict                            # {"act"|"grad": (shape, dtype)} arriving at this rank
    boundary: list                        # (shape, dtype) of every block's output, as strings
    act_bytes: list | None                # per stage: bytes saved per microbatch (theory) or None
    info: dict = field(default_factory=dict)  # meta.json "model"
    # virtual stages (pipeline.virtual=v): bounds has ranks x v entries (global stages), and this
    # rank runs chunks[c] = (first, end) with chunk_recv[c] = its {"act", "grad"} specs; `layers`
    # holds the blocks of all its chunks, in chunk order. One chunk: [bounds[rank]], [recv].
    chunks: list = field(default_factory=list)
    chunk_recv: list = field(default_factory=list)
    # {global block index: harness.models.digest of its initial weights}: every block where this
    # rank built the whole model (a factory's, the GPT), else this rank's blocks (the MLP)
    digests: dict = field(default_factory=dict)


@dataclass
class Model:
    """The config's whole model as this rank built and checked it (`prepare`), before any
    stage exists. The built-in MLP is built per stage instead: bm None, nothing probed."""
    bm: BlockModel | None
    shapes: list     # (shape, dtype) of every block's output for one microbatch
    digests: list    # per block: harness.models.digest of its initial weights


def autocast(cfg, device_type: str = "cpu"):
    """The forward's precision context: torch.autocast to bf16, or nothing for fp32."""
    if cfg.precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mlp_loss(out, y):
    # log_softmax + nll_loss (not cross_entropy): the pebbles then show log_softmax's output
    return F.nll_loss(F.log_softmax(out, dim=1), y)


def _gpt_cfg(cfg):
    g = cfg.gpt
    return {"vocab": g.vocab, "seq": g.seq, "d": g.d, "heads": g.heads, "layers": g.layers,
            "mlp_ratio": g.mlp_ratio, "attention": g.attention,
            "recompute": cfg.pipeline.recompute}


def block_model(cfg) -> BlockModel:
    """The whole model of the config (every rank builds all of it: each block is seeded by its
    index, so any split holds the same weights)."""
    if cfg.model.factory:
        return load_factory(cfg.model.factory, cfg.model, cfg.data.batch_size, cfg.train.seed)
    if cfg.model.name == "gpt":
        return gpt_mod.build_gpt(_gpt_cfg(cfg), cfg.data.batch_size, cfg.train.seed)
    raise ValueError(f"model.name={cfg.model.name!r}: no block model")  # mlp: built per stage


def prepare(cfg, stages: int, mb_rows: int) -> Model:
    """This rank's build of the config's whole model, checked before anything else happens:
    ModelError (one line, naming the key and, for a block that cannot run on a microbatch, the
    block and its input) or UserCodeError (the user's code raised: its traceback).
    stages: pipeline stages (ranks x pipeline.virtual); mb_rows: rows of one microbatch."""
    if cfg.model.name == "mlp" and not cfg.model.factory:
        return Model(None, [], [])
    where = (f"model.factory={cfg.model.factory!r}" if cfg.model.factory
             else f"model.name={cfg.model.name}")
    bm = block_model(cfg)   # a factory's errors name it already
    n, split = len(bm.blocks), cfg.pipeline.split
    if n < stages:
        raise ModelError(f"{where}: {n} blocks, fewer than the {stages} pipeline stages "
                         f"(ranks x pipeline.virtual)")
    if split and sum(split) != n:
        raise ModelError(f"pipeline.split={list(split)}: sums to {sum(split)}, {where} has "
                         f"{n} blocks")
    try:
        if cfg.precision == "bf16":  # meta tensors are not autocast: one real forward under it
            with autocast(cfg):
                shapes = probe_shapes(bm, mb_rows, real=True)
        else:
            shapes = probe_shapes(bm, mb_rows)
    except ModelError as e:
        raise ModelError(f"{where}: {e} ({mb_rows} rows = data.batch_size="
                         f"{cfg.data.batch_size} / pipeline.microbatches="
                         f"{cfg.pipeline.microbatches})") from e
    except UserCodeError as e:
        raise UserCodeError(f"{where}: {e}") from e
    return Model(bm, shapes, [block_digest(b) for b in bm.blocks])


def time_costs(bm: BlockModel, rows: int, repeats: int = 3) -> list[float]:
    """Per block: median seconds of one forward + backward on a microbatch of `rows` rows
    (pipeline.balance=time; measured once at set-up, identically on every rank)."""
    x, out = bm.example_input(rows), []
    for blk in bm.blocks:
        xin = x.detach().requires_grad_(x.is_floating_point())
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            y = blk(xin)
            y.float().sum().backward()
            ts.append(time.perf_counter() - t0)
        blk.zero_grad(set_to_none=True)
        out.append(sorted(ts)[len(ts) // 2])
        x = y.detach()
    return out


def _split(cfg, costs, stages):
    """[(first, end)] per global stage: `stages` (ranks x pipeline.virtual) contiguous chunks."""
    if cfg.pipeline.split:
        return mlp.split_from_sizes(cfg.pipeline.split)
    return mlp.partition(costs, stages)


def _chunked(st: "Stage", rank, pl, spec, blocks) -> "Stage":
    """Fill in this rank's chunks (which global stages it holds: the schedule's placement `pl`):
    spec(first, end) -> {"act", "grad"}; blocks(first, end) -> the blocks of that range."""
    gs = [pl.stage(rank, c) for c in range(pl.v)]
    st.chunks = [st.bounds[g] for g in gs]
    st.chunk_recv = [spec(*b) for b in st.chunks]
    st.recv = st.chunk_recv[0]
    st.layers = nn.ModuleList(blk for b in st.chunks for blk in blocks(*b))
    return st


def build(cfg, rank: int, placement, mb_rows: int, agree=lambda x: x,
          model: Model | None = None) -> Stage:
    """Rank `rank`'s stage; placement: the schedule's (harness.schedule.Placement: its p ranks
    and which of the p·v global stages each holds). agree(obj) -> rank 0's obj on every rank
    (comm.bcast): measured block times differ between ranks, the partition must not.
    model: this rank's `prepare`d model (default: prepared here)."""
    model = model or prepare(cfg, placement.stages, mb_rows)
    if model.bm is None:
        return _build_mlp(cfg, rank, placement, mb_rows)
    bm, shapes = model.bm, model.shapes
    costs = param_counts(bm)
    part = agree(time_costs(bm, mb_rows)) if cfg.pipeline.balance == "time" else costs
    bounds = _split(cfg, part, placement.stages)

    def spec(first, end):
        return {"act": tuple(shapes[first - 1]) if first > 0 else None,
                "grad": tuple(shapes[end - 1])}
    act = None
    if cfg.model.name == "gpt" and not cfg.model.factory:
        act = [gpt_stage_bytes(cfg, b, mb_rows, s == len(bounds) - 1)
               for s, b in enumerate(bounds)]
    boundary = [(list(s), str(d).replace("torch.", "")) for s, d in shapes]
    # layers and recv: filled in per chunk by _chunked
    st = Stage(nn.ModuleList(), bounds, costs, len(bm.blocks), list(bm.names), bm.loss, bm.data,
               {}, boundary, act,
               {"name": "factory" if cfg.model.factory else cfg.model.name,
                "factory": cfg.model.factory, "layers": len(bm.blocks), "names": bm.names,
                "batch_size": cfg.data.batch_size, "dtype": cfg.precision,
                "param_counts": costs, "balance": cfg.pipeline.balance,
                "balance_costs": part, "boundary": boundary})
    st.digests = dict(enumerate(model.digests))
    return _chunked(st, rank, placement, spec, lambda f, e: bm.blocks[f:e])


def _build_mlp(cfg, rank, placement, mb_rows) -> Stage:
    """Today's MLP: a rank builds only its own layers (seeded per layer, same weights)."""
    m = cfg.model
    costs = mlp.layer_params(m)
    bounds = _split(cfg, costs, placement.stages)
    w = mlp.widths(m)
    data = mlp.Data(m, cfg.data.batch_size, cfg.data.noise, cfg.train.seed)
    bf16 = cfg.precision == "bf16"
    # under autocast every layer's output is bf16 (Linear in bf16, ReLU keeps the dtype)
    dt = torch.bfloat16 if bf16 else torch.float32

    def spec(first, end):
        return {"act": ((mb_rows, w[first]), dt) if first > 0 else None,
                "grad": ((mb_rows, w[end]), dt)}
    act = [mlp.activation_bytes(m, b, mb_rows, s == len(bounds) - 1, bf16=bf16)
           for s, b in enumerate(bounds)]
    boundary = [([mb_rows, x], str(dt).replace("torch.", "")) for x in w[1:]]
    # layers and recv: filled in per chunk by _chunked
    st = Stage(nn.ModuleList(), bounds, costs, m.layers,
               [str(i) for i in range(m.layers)], mlp_loss, data.batch, {}, boundary, act,
               {"name": "mlp", "layers": m.layers, "widths": w,
                "batch_size": cfg.data.batch_size, "dtype": cfg.precision,
                "param_counts": costs, "boundary": boundary})
    st = _chunked(st, rank, placement, spec,
                  lambda f, e: mlp.build_stage(m, (f, e), cfg.train.seed))
    ids = [i for f, e in st.chunks for i in range(f, e)]
    st.digests = {i: block_digest(b) for i, b in zip(ids, st.layers)}
    return st


def gpt_stage_bytes(cfg, bounds, b: int, last: bool) -> int:
    """Bytes one GPT stage saves per microbatch of b rows (harness/models/gpt_memory.py, derived
    from the code): its blocks' saved tensors; on the last stage the loss's; elsewhere the stage
    output kept for backward(grad), which nothing inside the stage saves. The received input
    is the first block's saved input (one pebble), so it adds nothing."""
    g = _gpt_cfg(cfg)
    lo = 2 if cfg.precision == "bf16" else 4   # bytes of what autocast computes in bf16
    first, end = bounds
    total = 0
    for i in range(first, end):
        if i == 0:
            total += gpt_memory.saved_bytes_embed(g, b)["total"]
        elif i == g["layers"] + 1:
            total += gpt_memory.saved_bytes_head(g, b, dtype_bytes=lo)["total"]
        else:
            total += gpt_memory.saved_bytes_per_block(g, b, dtype_bytes=lo)["total"]
    if last:
        total += gpt_memory.saved_bytes_loss(g, b)["total"]
    else:
        total += 4 * b * g["seq"] * g["d"]
    return total
