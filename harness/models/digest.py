"""A fingerprint of each block's initial weights, so ranks can tell they built the same model.

Every rank builds every block of a factory's model (and of the GPT) from the seed and keeps its
stage's. A factory that draws weights from anything rank-dependent (the global generator after
a rank-dependent call, the pid) gives each rank a different model; the run would complete, with
losses that are not the one-process run's. Comparing these digests before step 0 refuses it.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

METHOD = ("sha256 of each block's initial parameters and buffers (names, dtypes, shapes and "
          "bytes, in registration order), first 16 hex digits")


def block_digest(block: nn.Module) -> str:
    """The block's digest (METHOD)."""
    h = hashlib.sha256()
    for name, t in (*block.named_parameters(), *block.named_buffers()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {str(t.dtype)} {list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def first_difference(views: list[list[str]], names: list[str]) -> str | None:
    """views[r]: rank r's digest of every block. None if every rank holds the same weights, else
    one line naming the first block that differs and the ranks whose weights are not rank 0's."""
    for i, name in enumerate(names):
        other = [r for r, v in enumerate(views) if v[i] != views[0][i]]
        if other:
            return (f"ranks built different models: block {i} {name!r} has other initial "
                    f"weights on rank{'s' if len(other) > 1 else ''} "
                    f"{', '.join(map(str, other))} than on rank 0; build every block from the "
                    f"seed alone, e.g. with harness.models.block_generator(seed, i), not from "
                    f"the global generator (docs/models.md)")
    return None
