"""What one calibration step's costs become under another configuration (analysis/predict/replay.py).

A `StepCosts` (analysis/predict/calibrate.py) holds one measured step: per block and action kind its
busy time, per action the interpreter time between blocks, the optimizer step, the gaps
between actions and the message times. `StepModel` maps them onto a `Target` (schedule,
microbatches, split, world size, ...):

- an action's busy time is the sum of its blocks' (the loss is block L of the last stage),
  each scaled from the calibration run's rows per microbatch to the target's by the block's
  own cost curve: its set-up times (meta.json ranks[r].block_times, harness/trace/blocktime.py)
  interpolated piecewise-linearly in rows; without them a line through the calibration runs'
  rows (two or more sizes); without either, proportional to rows (an assumption, said so);
- its interpreter time is the calibration action's when the action holds the same blocks, else
  the measured time per span (block) times its spans; the optimizer step is the rank's when
  the split is the same, else shared out by parameters;
- split backward from a full one: a block's B and W are its backward times the set-up ratios
  B/backward and W/backward (the first stage's B computes nothing: its W is its backward, as
  harness.core.splitgrad does it); a full backward from a split one is B + W;
- recomputation the calibration run did not have: each recomputed block's backward (B) reruns
  its share of its forward first (analysis/predict/target.py says which share);
- gaps and messages: analysis/predict/gaps.py.

Everything the model had to assume rather than read from the runs is added to `assumed`
(one line each), which analysis.whatif prints.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from harness.schedule import Placement

SPLIT_KINDS = ("bwd_in", "bwd_w")


def fit(df: pd.Series) -> tuple[float, float]:
    """(a, b) of y = a + b x through the per-x values of `df` (indexed by x); through the
    origin for one x."""
    if len(df) == 1:
        return 0.0, float(df.iloc[0] / df.index[0]) if df.index[0] else 0.0
    b, a = np.polyfit(df.index.to_numpy(float), df.to_numpy(float), 1)
    return float(a), float(b)


@dataclass
class StepCosts:
    """One calibration step's costs (seconds; calibrate.py's module docstring)."""
    run: str                # the calibration run's key (RunFacts.key)
    step: int
    rows: int               # rows per microbatch of that run
    layer: dict             # (layer, kind) -> busy s per action (layer L: the loss)
    extra: dict             # (rank, chunk, kind) -> (interpreter s per action, spans per action)
    opt: dict               # rank -> s of opt with its statistics
    gap: dict               # (rank, previous kind, kind) -> s
    msg: dict               # bytes -> transfer s, the receiver's ({"whole": ..., "all": ...,
    #                         "send": ..., "send_eager": ...} until chosen)
    send: dict = None       # bytes -> s until the send completed (the sender's)

    def with_messages(self, which: str, send: str = "send") -> "StepCosts":
        return replace(self, msg=dict(self.msg.get(which, {})),
                       send=dict(self.msg.get(send, {})))


@dataclass
class RunFacts:
    """What a calibration run's meta.json says about its model and layout."""
    key: str
    p: int
    rows: int
    split: list             # (first, end) per global stage
    layers: int             # blocks L; the loss is layer L
    placement: Placement
    params: list            # per block
    boundary: list          # per block: bytes per row of its output (what a message carries)
    curves: dict            # (layer, fwd|bwd) -> (rows array, seconds array), set-up times
    split_ratio: dict       # layer -> (B / backward, W / backward) at the run's rows
    per_layer: bool

    @classmethod
    def of(cls, meta: dict, key: str) -> "RunFacts":
        sch, model = meta.get("schedule") or {}, meta.get("model") or {}
        p = int(meta.get("world_size") or 1)
        m = int(sch.get("microbatches") or 1)
        rows = int(model.get("batch_size") or 0) // m
        curves, ratio = {}, {}
        for rk in meta.get("ranks") or []:
            bt = (rk or {}).get("block_times") or {}
            xs = np.asarray(bt.get("rows") or [], float)
            for c in bt.get("chunks") or []:
                for i, layer in enumerate(c["blocks"]):
                    for k in ("fwd", "bwd"):
                        curves[layer, k] = (xs, np.asarray(c[k][i], float))
                    b, w, full = c["bwd_in"][i], c["bwd_w"][i], c["bwd"][i]
                    at = full[list(xs).index(rows)] if rows in xs else None
                    if b is not None and at:
                        ratio[layer] = (b / at, w / at)
        return cls(key, p, rows, [tuple(x) for x in meta.get("split") or []],
                   int(model.get("layers") or 0),
                   Placement(p, int(sch.get("virtual") or 1), sch.get("placement") or "loop"),
                   list(model.get("param_counts") or []), _boundary(model), curves, ratio,
                   bool((meta.get("trace") or {}).get("per_layer", True)))

    def layers_of(self, rank: int, chunk: int) -> list:
        """The blocks of a rank's chunk, with the loss (L) on the last stage's."""
        g = self.placement.stage(rank, chunk)
        lo, hi = self.split[g]
        return list(range(lo, hi)) + [self.layers] * (g == self.placement.stages - 1)

    def rank_of(self, layer: int) -> int:
        """The rank that ran a block (the loss: the last stage's)."""
        for g, (lo, hi) in enumerate(self.split):
            if lo <= layer < hi:
                return self.placement.where(g)[0]
        return self.placement.where(self.placement.stages - 1)[0]


def _boundary(model: dict) -> list:
    """Bytes per row of each block's output, from meta.json's model.boundary ([shape, dtype]
    at the run's microbatch size) or the MLP's widths (fp32)."""
    size = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8}
    if model.get("boundary"):
        return [int(np.prod(shape[1:])) * size.get(dt, 4) for shape, dt in model["boundary"]]
    if model.get("widths"):
        return [4 * w for w in model["widths"][1:]]
    return []


@dataclass
class Target:
    """The configuration predicted: schedule, microbatches, world size, chunks per rank,
    overlap, split (first, end) per global stage, and stage-time scales."""
    schedule: str
    m: int
    batch: int
    p: int
    placement: Placement
    overlap: bool
    split: list
    scales: tuple = ()
    recompute: dict = None  # layer -> share of its forward rerun in its backward (B), if the
    #                         target recomputes what the calibration run did not

    @property
    def rows(self) -> int:
        return self.batch // self.m

    def layers_of(self, rank: int, chunk: int, loss: int) -> list:
        g = self.placement.stage(rank, chunk)
        lo, hi = self.split[g]
        return list(range(lo, hi)) + [loss] * (g == self.placement.stages - 1)


class StepModel:
    """Compute costs of the target's actions in each calibration step (module docstring)."""

    def __init__(self, runs: list, target: Target, assumed: set):
        self.runs = {f.key: f for f in runs}
        self.base, self.t, self.assumed = runs[0], target, assumed
        self.lines = {}         # (layer, kind) -> (a, b) through the runs' rows, if >= 2 sizes

    def fit_lines(self, steps: list) -> None:
        """Per (layer, kind) a line through the median busy time at each calibration rows."""
        by = {}
        for st in steps:
            for key, v in st.layer.items():
                by.setdefault(key, {}).setdefault(st.rows, []).append(v)
        self.lines = {k: fit(pd.Series({x: float(np.median(v)) for x, v in sorted(d.items())}))
                      for k, d in by.items() if len(d) > 1}

    def scale(self, st: StepCosts, layer: int, kind: str) -> float:
        """A block's busy time at the target's rows over the same at the step's rows."""
        x0, x1 = st.rows, self.t.rows
        if x0 == x1:
            return 1.0
        base = "fwd" if kind == "fwd" else "bwd"
        curve = self.runs[st.run].curves.get((layer, base))
        if curve is not None and len(curve[0]) > 1:
            y0, y1 = (float(np.interp(x, *curve)) if curve[0][0] <= x <= curve[0][-1]
                      else _extrapolate(curve, x) for x in (x0, x1))
            if y0 > 0:
                return y1 / y0
        line = self.lines.get((layer, kind))
        if line is not None and line[0] + line[1] * x0 > 0:
            return (line[0] + line[1] * x1) / (line[0] + line[1] * x0)
        self.assumed.add(f"compute: busy time proportional to rows per microbatch ({x0} -> "
                         f"{x1}): no set-up block times (trace.block_times) and one "
                         f"microbatch size measured")
        return x1 / x0

    def unit(self, st: StepCosts, layer: int, kind: str, stage: int) -> float:
        """Busy seconds of one block (layer) in one `kind` action of global stage `stage`,
        with the forward it reruns first if the target recomputes it."""
        share = (self.t.recompute or {}).get(layer, 0.0)
        again = 0.0
        if share and kind in ("bwd", "bwd_in") and (layer, "fwd") in st.layer:
            again = share * st.layer[layer, "fwd"] * self.scale(st, layer, "fwd")
        return again + self._unit(st, layer, kind, stage)

    def _unit(self, st: StepCosts, layer: int, kind: str, stage: int) -> float:
        f = st.layer.get
        if (layer, kind) in st.layer:
            return f((layer, kind)) * self.scale(st, layer, kind)
        if kind in SPLIT_KINDS and (layer, "bwd") in st.layer:
            full = f((layer, "bwd")) * self.scale(st, layer, "bwd")
            if stage == 0:          # B has no input gradient to compute: W does it all
                return full * (kind == "bwd_w")
            if layer == self.base.layers:   # the loss has no weights: its backward is B
                return full * (kind == "bwd_in")
            ratio = self.runs[st.run].split_ratio.get(layer)
            if ratio is None:
                self.assumed.add("split backward: B and W each half a block's backward (no "
                                 "set-up B/W times)")
                ratio = (0.5, 0.5)
            return full * ratio[kind == "bwd_w"]
        if kind == "bwd" and (layer, "bwd_in") in st.layer:
            self.assumed.add("full backward = the measured B + W (split backward costs a "
                             "little more than one backward)")
            w = f((layer, "bwd_w"), 0.0) * self.scale(st, layer, "bwd_w")
            return f((layer, "bwd_in")) * self.scale(st, layer, "bwd_in") + w
        return 0.0      # W of a block that is not its chunk's first: in the chunk's one span

    def action(self, st: StepCosts, rank: int, kind: str, chunk: int) -> tuple[float, float]:
        """(wall, busy) seconds of the target's `kind` action of (rank, chunk) in step st."""
        if kind == "opt":
            return (self.opt(st, rank),) * 2
        t = self.t
        layers = t.layers_of(rank, chunk, self.base.layers)
        if not self.base.per_layer:
            if t.split != self.base.split or t.p != self.base.p:
                raise ValueError("another split or world size needs per-layer traces "
                                 "(trace.per_layer=true)")
            layers = [-1 - rank]
        g = t.placement.stage(rank, chunk)
        busy = sum(self.unit(st, x, kind, g) for x in layers)
        return busy + self.extra(st, rank, chunk, kind, layers), busy

    def extra(self, st: StepCosts, rank: int, chunk: int, kind: str, layers: list) -> float:
        """Interpreter seconds of an action: the calibration action's own when it held the
        same blocks, else the measured seconds per span times its spans."""
        same = rank < self.base.p and chunk < self.base.placement.v and \
            self.base.layers_of(rank, chunk) == layers
        if same and (rank, chunk, kind) in st.extra:
            return st.extra[rank, chunk, kind][0]
        like = {"bwd_in": "bwd", "bwd_w": "bwd", "bwd": "bwd_in"}
        for k in (kind, like.get(kind)):
            rows = [v for (_, _, kk), v in st.extra.items() if kk == k]
            if rows:
                per_span = sum(e for e, _ in rows) / max(sum(n for _, n in rows), 1e-12)
                return per_span * (1 if kind == "bwd_w" else len(layers))
        return 0.0

    def opt(self, st: StepCosts, rank: int) -> float:
        """The optimizer step: the rank's own in a calibration of the same split and ranks,
        else each block's share of its calibration rank's step by parameters."""
        b, t = self.base, self.t
        if t.split == b.split and t.p == b.p and t.placement.v == b.placement.v:
            return st.opt.get(rank, 0.0)
        if not b.params:
            return float(np.mean(list(st.opt.values()) or [0.0]))
        self.assumed.add("optimizer step: each block's share of its rank's step in proportion "
                         "to its parameters (the split differs from the calibration run's)")
        own = {r: sum(b.params[x] for x in b.layers_of(r, c) if x < b.layers)
               for r in range(b.p) for c in range(b.placement.v)}
        total = 0.0
        for c in range(t.placement.v):
            for x in t.layers_of(rank, c, b.layers):
                if x < b.layers:
                    r0 = b.rank_of(x)
                    total += st.opt.get(r0, 0.0) * b.params[x] / max(own.get(r0, 1), 1)
        return total


def _extrapolate(curve, x: float) -> float:
    """A cost curve beyond its measured rows: the line through its two nearest points."""
    xs, ys = curve
    i = (0, 1) if x < xs[0] else (-2, -1)
    (xa, xb), (ya, yb) = xs[list(i)], ys[list(i)]
    return float(ya + (yb - ya) * (x - xa) / (xb - xa)) if xb != xa else float(ya)
