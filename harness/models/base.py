"""The block-model protocol: what the harness needs from any model it splits into pipeline stages.

A model is an ordered list of blocks, each one tensor in -> one tensor out, so any contiguous
run of blocks is a stage and the tensor between two blocks is what crosses a stage boundary.
The harness never looks inside a block; it needs only the pieces of `BlockModel` below.
"""
from __future__ import annotations

import contextlib
import importlib
import traceback
from dataclasses import dataclass
from pathlib import Path
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


class ModelError(ValueError):
    """A model fails one of the harness's own checks (its type, its names, a block that cannot
    run on a microbatch): the message says it in one line."""


class UserCodeError(Exception):
    """The user's own code (a factory, its module, example_input) raised: the message is a
    heading line and the traceback from the user's first frame on (`raised`)."""


def raised(heading: str, e: BaseException) -> UserCodeError:
    """A UserCodeError: `heading`, then e's traceback without the harness's frames."""
    return UserCodeError(f"{heading}\n{user_traceback(e)}".rstrip("\n"))


_HARNESS = str(Path(__file__).resolve().parent.parent)
_TORCH = str(Path(torch.__file__).resolve().parent)


def user_traceback(e: BaseException) -> str:
    """e's traceback from the first frame outside the harness and Python's import machinery on:
    what the user wrote, and what it called."""
    tb = e.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename.startswith((_HARNESS, "<frozen "))):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb or e.__traceback__))


def user_line(e: BaseException) -> str:
    """' at file.py:line': the innermost frame of e's traceback in neither torch nor the
    harness (the user's line that failed), or ''."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith((_HARNESS, _TORCH, "<"))]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


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
    x = _example(model, rows).to("meta")
    out = []
    for blk in model.blocks:
        state = {n: torch.empty_like(t, device="meta")
                 for n, t in (*blk.named_parameters(), *blk.named_buffers())}
        x = torch.func.functional_call(blk, state, (x,))
        out.append((x.shape, x.dtype))
    return out


def _probe_real(model: BlockModel, rows: int) -> list[tuple[torch.Size, torch.dtype]]:
    x, out = _example(model, rows), []
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            x = _forward(model, i, x, rows)
            out.append((x.shape, x.dtype))
    return out


def _example(model: BlockModel, rows: int) -> Tensor:
    try:
        x = model.example_input(rows)
    except Exception as e:  # noqa: BLE001 - the user's code: its traceback, once
        raise raised(f"example_input({rows}) raised an exception:", e) from e
    if not isinstance(x, Tensor):
        raise ModelError(f"example_input({rows}) returns {type(x).__name__}, not a tensor")
    return x


def _forward(model: BlockModel, i: int, x: Tensor, rows: int) -> Tensor:
    """Block i on x, or a ModelError naming the block, the microbatch's rows and its input."""
    on = f"on a microbatch of {rows} rows, its input {list(x.shape)} {str(x.dtype)[6:]}"
    try:
        y = model.blocks[i](x)
    except Exception as e:  # noqa: BLE001 - whatever the user's forward raises, it is named
        msg = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"block {i} {model.names[i]!r} fails {on}: {type(e).__name__}: "
                         f"{msg}{user_line(e)}") from e
    if not isinstance(y, Tensor):
        raise ModelError(f"block {i} {model.names[i]!r} returns {type(y).__name__}, not one "
                         f"tensor, {on}")
    return y


def probe_shapes(model: BlockModel, rows: int, real: bool = False
                 ) -> list[tuple[torch.Size, torch.dtype]]:
    """(shape, dtype) of every block's output for a microbatch of `rows` rows.

    Runs the blocks on torch's meta device: exact shapes at the real size, no memory, no FLOPs.
    A block whose forward makes tensors on a fixed device (e.g. `torch.arange(n)` without
    `device=x.device`) cannot run on meta; then we fall back to one real forward under no_grad
    at the real size (exact too, just slower). real=True always runs the real forward: what
    the caller's context changes (torch.autocast's dtypes) does not reach meta tensors.
    A block that fails raises ModelError naming it, its input and `rows`.
    """
    if real:
        return _probe_real(model, rows)
    try:
        return _probe_meta(model, rows)
    except Exception:  # noqa: BLE001 - the real forward says what is wrong, naming the block
        return _probe_real(model, rows)


def check_model(model, where: str) -> BlockModel:
    """Raise ModelError naming `where` unless `model` keeps the structural protocol."""
    def bad(msg):
        raise ModelError(f"{where}: {msg}")
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

    Every error names `spec`: a ValueError (ModelError) when the harness finds something wrong,
    so a typo in `model.factory` reads as one; UserCodeError when the factory itself raised.
    """
    fn = resolve_factory(spec)
    try:
        model = fn(cfg, batch_size, seed)
    except Exception as e:  # noqa: BLE001 - the user's code: its traceback, once
        raise raised(f"model.factory={spec!r} raised an exception:", e) from e
    return check_model(model, f"model.factory={spec!r}")


def resolve_factory(spec: str):
    """The function "package.module:function" names (imported, not called); ValueError naming
    `spec` if it is not there, UserCodeError if importing the module raised (harness.config
    checks this before any rank communicates)."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"model.factory={spec!r}: expected 'package.module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"model.factory={spec!r}: cannot import module {mod_name!r} ({e})") from e
    except Exception as e:  # noqa: BLE001 - the user's module raised while it was imported
        raise raised(f"model.factory={spec!r}: importing {mod_name!r} raised an exception:",
                     e) from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"model.factory={spec!r}: module {mod_name!r} has no function {fn_name!r}")
    return fn
