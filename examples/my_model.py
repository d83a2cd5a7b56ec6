"""A user's own model for the harness: a tiny residual MLP classifier, as a BlockModel.

Run it with `model.factory=examples.my_model:build` (docs/models.md). What makes it pipeline-ready:
- it is a list of blocks, each one tensor in -> one tensor out ([B, in] -> [B, w] -> ... -> [B, k]);
- every block draws its weights from `block_generator(seed, i)`, so every rank builds the same
  model, whatever the split;
- `data(step)` is a function of (seed, step) only, so stage 0 (inputs) and the last stage
  (targets) make the same batch without talking to each other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.models import BlockModel, block_generator


class Residual(nn.Module):
    """x + W2 GELU(W1 LN(x)). x: [B, w] -> [B, w]."""

    def __init__(self, width: int):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 2 * width), \
            nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


def _init(block: nn.Module, gen: torch.Generator) -> nn.Module:
    # re-draw every Linear from the block's own generator (the constructors used the global RNG,
    # which differs between ranks that build different things)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5, generator=gen)
                m.bias.zero_()
    return block


def build(cfg, batch_size: int, seed: int) -> BlockModel:
    """cfg: any object; reads in_features, width, depth, classes if present (defaults below)."""
    n_in = getattr(cfg, "in_features", 32)    # input features
    width = getattr(cfg, "width", 64)         # hidden width of the residual stream
    depth = getattr(cfg, "depth", 4)          # residual blocks
    classes = getattr(cfg, "classes", 10)     # output classes
    blocks = [nn.Linear(n_in, width)] + [Residual(width) for _ in range(depth)] \
        + [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, classes))]
    blocks = [_init(b, block_generator(seed, i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        blocks[-1][1].weight.mul_(0.1)  # small head: the first loss is ~ln(classes), not larger

    # synthetic task: the label is the argmax of a fixed random linear map of x (learnable)
    teacher = torch.randn(n_in, classes, generator=torch.Generator().manual_seed(seed + 1))

    def data(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 104729 * (step + 2))
        x = torch.randn(batch_size, n_in, generator=g)   # [B, in]
        return x, (x @ teacher).argmax(1)                # [B] int64

    return BlockModel(
        blocks=blocks,
        loss=F.cross_entropy,                            # mean over the microbatch
        data=data,
        names=["stem"] + [f"res.{i}" for i in range(depth)] + ["head"],
        example_input=lambda rows: torch.zeros(rows, n_in),
    )
