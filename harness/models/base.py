"""The block-model protocol: what the harness needs from any model it splits into pipeline stages.

A model is an ordered list of blocks, each one tensor in -> one tensor out, so any contiguous
run of blocks is a stage and the tensor between two blocks is what crosses a stage boundary.
The harness never looks inside a block; it needs only the pieces of `BlockModel` below.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class BlockModel:
    """A model as the pipeline sees it (docs/models.md has the full contract)."""

    blocks: list[nn.Module]
    """Ordered blocks; block i maps one tensor to one tensor. Block 0 may take integer ids."""
    loss: Callable[[Tensor, Tensor], Tensor]
    """(last block's output for one microbatch, its targets) -> scalar MEAN loss over it."""
    data: Callable[[int], tuple[Tensor, Tensor]]
    """step -> (inputs, targets) of the FULL batch, a function of (seed, step) only; dim 0 is batch."""
    names: list[str]
    """One name per block, e.g. "embed", "blocks.0", ..., "head" (traces and logs use them)."""
    example_input: Callable[[int], Tensor]
    """rows -> a tensor shaped and typed like block 0's input for that many rows (shape probing)."""


# Recomputation, seen by the harness. torch.utils.checkpoint's `context_fn` returns (context of
# the first forward, context of the recomputation in backward); a model that checkpoints passes
# `recompute_context(name)`, and the executor installs an observer that times the recomputation
# as its own span (kind `recompute`). Without an observer both contexts do nothing.
_recompute_observer = None


def set_recompute_observer(observer) -> None:
    """observer(name) -> a context manager around one recomputation (None: stop observing)."""
    global _recompute_observer
    _recompute_observer = observer


def recompute_context(name: str):
    """A `context_fn` for torch.utils.checkpoint(..., use_reentrant=False) naming what it
    recomputes (a module path such as blocks.3 or blocks.3.attn)."""
    def contexts():
        obs = _recompute_observer
        return contextlib.nullcontext(), (obs(name) if obs else contextlib.nullcontext())
    return contexts


def block_generator(seed: int, index: int) -> torch.Generator:
    """The generator block `index` draws its initial weights from: a function of (seed, index)
    only, so a rank that builds all blocks and one that builds a few hold identical weights.
    Same formula as harness/models/mlp.py's layers."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (index + 1))


def param_counts(model: BlockModel) -> list[int]:
    """Parameters per block (the cost the partitioner balances)."""
    return [sum(p.numel() for p in b.parameters()) for b in model.blocks]


def _probe_meta(model: BlockModel, rows: int) -> list[tuple[torch.Size, torch.dtype]]:
    # functional_call swaps each block's parameters and buffers for meta tensors (shape and
    # dtype only, no storage), so the probe neither copies weights nor computes anything.
    x = model.example_input(rows).to("meta")
    out = []
    for blk in model.blocks:
        state = {n: torch.empty_like(t, device="meta")
                 for n, t in (*blk.named_parameters(), *blk.named_buffers())}
        x = torch.func.functional_call(blk, state, (x,))
        out.append((x.shape, x.dtype))
    return out


def _probe_real(model: BlockModel, rows: int) -> list[tuple[torch.Size, torch.dtype]]:
    x, out = model.example_input(rows), []
    with torch.no_grad():
        for blk in model.blocks:
            x = blk(x)
            out.append((x.shape, x.dtype))
    return out


def probe_shapes(model: BlockModel, rows: int, real: bool = False
                 ) -> list[tuple[torch.Size, torch.dtype]]:
    """(shape, dtype) of every block's output for a microbatch of `rows` rows.

    Runs the blocks on torch's meta device: exact shapes at the real size, no memory, no FLOPs.
    A block whose forward makes tensors on a fixed device (e.g. `torch.arange(n)` without
    `device=x.device`) cannot run on meta; then we fall back to one real forward under no_grad
    at the real size (exact too, just slower). real=True always runs the real forward: what
    the caller's context changes (torch.autocast's dtypes) does not reach meta tensors.
    """
    if real:
        return _probe_real(model, rows)
    try:
        return _probe_meta(model, rows)
    except (RuntimeError, NotImplementedError, TypeError):
        return _probe_real(model, rows)


def check_model(model, where: str) -> BlockModel:
    """Raise ValueError naming `where` unless `model` keeps the structural protocol."""
    def bad(msg):
        raise ValueError(f"{where}: {msg}")
    if not isinstance(model, BlockModel):
        bad(f"returned {type(model).__name__}, expected harness.models.BlockModel")
    if not isinstance(model.blocks, (list, tuple)) or not model.blocks:
        bad("blocks must be a non-empty list of nn.Module")
    for i, b in enumerate(model.blocks):
        if not isinstance(b, nn.Module):
            bad(f"blocks[{i}] is {type(b).__name__}, not an nn.Module")
    names = list(model.names) if isinstance(model.names, (list, tuple)) else None
    if names is None or len(names) != len(model.blocks):
        bad(f"names must be a list with one name per block ({len(model.blocks)} blocks)")
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        bad(f"names must be distinct non-empty strings, got {names}")
    for f in ("loss", "data", "example_input"):
        if not callable(getattr(model, f)):
            bad(f"{f} must be callable")
    return model


def load_factory(spec: str, cfg, batch_size: int, seed: int) -> BlockModel:
    """Import "package.module:function", call function(cfg, batch_size, seed), check the result.

    Every error is a ValueError that names `spec`, so a typo in `model.factory` reads as one.
    """
    return check_model(resolve_factory(spec)(cfg, batch_size, seed), f"model.factory={spec!r}")


def resolve_factory(spec: str):
    """The function "package.module:function" names (imported, not called); ValueError naming
    `spec` if it is not there (harness.config checks this before any rank communicates)."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"model.factory={spec!r}: expected 'package.module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"model.factory={spec!r}: cannot import module {mod_name!r} ({e})") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"model.factory={spec!r}: module {mod_name!r} has no function {fn_name!r}")
    return fn
