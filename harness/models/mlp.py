"""The deep MLP, its partition into stages, and the synthetic data it learns.

Every layer is initialised from its own generator seeded by (seed, layer index), so a rank builds
only the layers of its own stage and still holds exactly the weights a single process would: runs
with different world sizes start from the same model.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    """One layer of the MLP: Linear, then ReLU unless it is the head. x: [B, fan_in] -> [B, fan_out]."""

    def __init__(self, fan_in: int, fan_out: int, relu: bool, gen: torch.Generator):
        super().__init__()
        self.linear = nn.Linear(fan_in, fan_out)
        self.act = nn.ReLU() if relu else None
        with torch.no_grad():
            # He init keeps activations from vanishing through 16 ReLU layers (He et al. 2015);
            # the head starts 10x smaller so the initial loss is ~ln(classes), not larger.
            std = math.sqrt(2.0 / fan_in) if relu else 0.1 * math.sqrt(1.0 / fan_in)
            self.linear.weight.normal_(0.0, std, generator=gen)
            self.linear.bias.zero_()

    def forward(self, x):
        h = self.linear(x)
        return self.act(h) if self.act is not None else h


def widths(m) -> list[int]:
    """Feature sizes along the model: widths[i] -> widths[i+1] is layer i (len = layers + 1)."""
    return [m.in_features] + [m.width] * (m.layers - 1) + [m.classes]


def layer_params(m) -> list[int]:
    w = widths(m)
    return [w[i] * w[i + 1] + w[i + 1] for i in range(m.layers)]


def build_layer(m, i: int, seed: int) -> Block:
    w = widths(m)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (i + 1))
    return Block(w[i], w[i + 1], relu=i < m.layers - 1, gen=gen)


def partition(costs: list[int], p: int) -> list[tuple[int, int]]:
    """Split layers into p contiguous stages minimising the largest stage cost (parameters).

    Classic linear partition by dynamic programming, O(p * L^2); ties go to the split that puts
    more layers early. Returns [(first, end)] per stage, end exclusive.
    """
    n = len(costs)
    if not 1 <= p <= n:
        raise ValueError(f"cannot split {n} layers into {p} stages")
    pre = [0]
    for c in costs:
        pre.append(pre[-1] + c)
    inf = float("inf")
    # best[k][j]: minimal max-cost of splitting the first j layers into k stages
    best = [[inf] * (n + 1) for _ in range(p + 1)]
    cut = [[0] * (n + 1) for _ in range(p + 1)]
    best[0][0] = 0
    for k in range(1, p + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], pre[j] - pre[i])
                if v < best[k][j] or (v == best[k][j] and i > cut[k][j]):
                    best[k][j], cut[k][j] = v, i
    bounds, j = [], n
    for k in range(p, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def split_from_sizes(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out


def build_stage(m, bounds: tuple[int, int], seed: int) -> nn.ModuleList:
    return nn.ModuleList(build_layer(m, i, seed) for i in range(*bounds))


class Data:
    """Synthetic classification: x = centre[y] + noise, y uniform over classes.

    The batch of step t depends only on (seed, t), so every rank that needs it (stage 0 for x,
    the last stage for y) makes the same batch without communication. x: [B, in], y: [B] int64.
    """

    def __init__(self, m, batch_size: int, noise: float, seed: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 1)
        self.centres = torch.randn(m.classes, m.in_features, generator=g)
        self.batch_size, self.noise, self.seed = batch_size, noise, seed

    def batch(self, step: int, need_x: bool = True):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 104729 * (step + 2))
        y = torch.randint(0, self.centres.shape[0], (self.batch_size,), generator=g)
        if not need_x:  # y is drawn first, so skipping x leaves y unchanged
            return None, y
        x = self.centres[y] + self.noise * torch.randn(self.batch_size, self.centres.shape[1],
                                                       generator=g)
        return x, y


def activation_bytes(m, bounds: tuple[int, int], stage_batch: int, last: bool,
                     itemsize: int = 4, bf16: bool = False) -> int:
    """Bytes a stage saves for backward per microbatch of `stage_batch` samples (analytic).

    Counted from the layer shapes alone: the stage input (saved by the first Linear to form its
    weight gradient), each ReLU output (saved by ReLU and reused as the next Linear's input, so
    counted once), and on the last stage the cross-entropy's log-softmax output [B, classes],
    its int64 targets and nll_loss's scalar total weight.

    bf16 (precision=bf16, CPU autocast): each Linear saves the bf16 copy of its input (the stage
    input is cast once; later inputs are already bf16 ReLU outputs) and, when its input needs a
    gradient (every layer but the model's first, whose input is data), the bf16 copy autocast
    makes of its weight (not a parameter's storage, so it is an activation-like pebble, made
    anew in every forward); ReLU outputs are bf16; log_softmax runs in fp32 (autocast's fp32
    list), so the loss's bytes are as in fp32, plus the bf16 logits [B, classes], which autograd
    keeps for the cast to fp32 (measured with torch 2.13 on CPU; tests/test_precision_mpi.py).
    """
    w = widths(m)
    first, end = bounds
    act = 2 if bf16 else itemsize
    total = stage_batch * w[first] * act
    for i in range(first, end):
        if bf16 and i > 0:
            total += 2 * w[i] * w[i + 1]          # the weight's bf16 copy, [out, in]
        if i < m.layers - 1:
            total += stage_batch * w[i + 1] * act
    if last:
        total += stage_batch * m.classes * itemsize + stage_batch * 8 + itemsize
        total += 2 * stage_batch * m.classes if bf16 else 0
    return total
