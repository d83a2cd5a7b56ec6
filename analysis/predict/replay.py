"""A step predicted: the calibration run's steps replayed through harness.simulate for another
schedule, microbatch count, split, world size, or a faster or slower stage (what
analysis.whatif prints and the summary's `bubble_simulated` is).

Each kept calibration step (analysis/predict/calibrate.py) becomes one predicted step: its costs mapped
onto the target (analysis/predict/costs.py, analysis/predict/gaps.py), simulated. The prediction is the median
over them, as the measured step time is the median over steady steps; the interquartile range
says how much the calibration steps differed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.predict.calibrate import KINDS, Calibration
from analysis.predict.costs import StepModel, Target
from analysis.predict.gaps import Gaps, Messages
from harness import schedule as S
from harness.schedule.simulate import simulate


@dataclass
class Scale:
    """Multiply the compute time of `rank` (None: every rank) and `kind` (None: all) by factor."""
    rank: int | None
    kind: str | None
    factor: float

    def applies(self, rank: int, kind: str) -> bool:
        return (self.rank is None or self.rank == rank) and (self.kind is None or self.kind == kind)


@dataclass
class Prediction:
    schedule: str
    m: int
    rows: int
    overlap: bool
    step_s: float                 # median over the replayed steps of the span: first compute
    #                               start to last compute end, all ranks
    bubble: float                 # median of the mean over ranks of (span - compute) / span
    idle: list                    # per rank, the median idle share
    peak_act_bytes: list          # per rank: bytes per microbatch x most microbatches in flight
    frame: pd.DataFrame           # rank, kind, mb, start, end (s) of the median step
    latency_s: float              # seconds per message until its receive completes (median
    #                               over steps; latency_send_s: until its send completes)
    protocol: str
    spread: tuple = (0.0, 0.0)    # 25th and 75th percentile of the replayed steps' spans
    p: int = 0
    split: list = field(default_factory=list)
    assumed: list = field(default_factory=list)   # what was not measured, one line each
    latency_send_s: float = 0.0


def target_of(cal: Calibration, schedule: str, m: int, batch: int | None = None,
              overlap: bool = False, scales=(), virtual: int | None = None,
              p: int | None = None, split=None, recompute=None) -> Target:
    """The Target of a what-if; split: (first, end) per global stage (default the calibration
    run's, which needs the same number of global stages)."""
    batch = batch or cal.batch
    if batch % m:
        raise ValueError(f"pipeline.microbatches={m}: must divide data.batch_size={batch}")
    base = cal.runs[0]
    p = p or base.p
    v = base.placement.v if virtual is None else virtual
    pl = S.placement_of(S.build(schedule, p, m, overlap, virtual=v))
    split = [tuple(x) for x in (split or base.split)]
    if len(split) != pl.stages:
        raise ValueError(f"{pl.stages} stages ({p} ranks x {pl.v} chunks) but the split has "
                         f"{len(split)}: give pipeline.split")
    return Target(schedule, m, batch, p, pl, overlap, split, tuple(scales), recompute)


def predict(cal: Calibration, schedule: str, m: int, batch: int | None = None,
            overlap: bool = False, scales=(), protocol: str | None = None,
            virtual: int | None = None, p: int | None = None, split=None,
            stage_bytes=None, recompute=None) -> Prediction:
    """The step of `schedule` with m microbatches of batch/m rows on p ranks (default the
    calibration run's) with `split` (first, end) per global stage. stage_bytes: activation
    bytes one microbatch leaves on each global stage (default: the calibration run's per rank,
    scaled to the rows; needed when the split or world size differs). recompute: {layer:
    share of its forward its backward reruns} (analysis.predict.target.recompute_share)."""
    t = target_of(cal, schedule, m, batch, overlap, scales, virtual, p, split, recompute)
    if not cal.steps:
        raise ValueError("no steady step to replay (the run needs two complete steps)")
    sched = S.build(schedule, t.p, m, overlap, virtual=t.placement.v)
    assumed = set()
    model = StepModel(cal.runs, t, assumed)
    model.fit_lines(cal.steps)
    gaps, msgs = Gaps(cal.steps, cal.runs[0].p, assumed), Messages(cal.steps, assumed)
    nbytes = _message_bytes(cal, t)
    proto = protocol or cal.protocol
    if not msgs.typical and protocol is None:
        proto = "rendezvous"
    kinds = {(r, a.kind, a.chunk) for r, acts in enumerate(sched) for a in acts
             if a.kind in KINDS}

    def factor(r, kind):
        f = 1.0
        for s in scales:
            f *= s.factor if s.applies(r, kind) else 1.0
        return f
    runs = []
    for st in cal.steps:
        cost = {}
        for r, k, c in kinds:
            wall, busy = model.action(st, r, k, c)
            cost[r, k, c] = (wall * factor(r, k), busy * factor(r, k))
        gap = lambda r, a, prev, st=st: 0.0 if prev is None else gaps.of(  # noqa: E731
            st, r, t.p, prev.kind, a.kind)
        lat = msgs.seconds(st, nbytes, t.p)
        ops = simulate(sched, lambda r, a, cost=cost: cost[r, a.kind, a.chunk][0]
                       if a.kind in KINDS else 0.0, lat, protocol=proto, gap=gap)
        comp = [o for o in ops if o.kind in KINDS]
        span = max(o.end for o in comp) - min(o.start for o in comp)
        busy = [sum(cost[r, a.kind, a.chunk][1] for a in acts if a.kind in KINDS)
                for r, acts in enumerate(sched)]
        runs.append((span, [(span - b) / span if span else 0.0 for b in busy], ops, lat[0],
                     lat[1]))
    spans = np.array([x[0] for x in runs])
    mid = runs[int(np.argmin(np.abs(spans - np.median(spans))))]
    idle = [float(np.median([x[1][r] for x in runs])) for r in range(t.p)]
    fr = pd.DataFrame([(o.rank, o.kind, o.mb, o.start, o.end, o.chunk) for o in mid[2]],
                      columns=["rank", "kind", "mb", "start", "end", "chunk"])
    return Prediction(schedule, m, t.rows, overlap, float(np.median(spans)),
                      float(np.median([np.mean(x[1]) for x in runs])), idle,
                      _peaks(cal, t, sched, stage_bytes), fr,
                      float(np.median([x[3] for x in runs])), proto,
                      (float(np.percentile(spans, 25)), float(np.percentile(spans, 75))),
                      t.p, t.split, sorted(assumed), float(np.median([x[4] for x in runs])))


def _message_bytes(cal: Calibration, t: Target) -> float:
    """Bytes of one message of the target: as measured (a line in rows) where the stages meet
    where they met in the calibration run, else the mean over the target's stage boundaries of
    the block output crossing it (meta.json's model.boundary)."""
    per_row = cal.runs[0].boundary
    cuts = [hi - 1 for hi in (b for _, b in t.split[:-1])]
    same = cuts == [hi - 1 for hi in (b for _, b in cal.runs[0].split[:-1])]
    if not same and per_row and cuts and all(c < len(per_row) for c in cuts):
        return float(np.mean([per_row[c] for c in cuts])) * t.rows
    return cal.message_bytes(t.rows)


def _peaks(cal: Calibration, t: Target, sched, stage_bytes) -> list:
    """Per rank, the most activation bytes in flight: each chunk-microbatch holds its global
    stage's bytes (stage_bytes, or the calibration run's per rank at the target's rows)."""
    pl = t.placement
    if stage_bytes is not None:
        per = [[stage_bytes[pl.stage(r, c)] for c in range(pl.v)] for r in range(t.p)]
    else:
        base = cal.runs[0]
        if t.split != base.split or t.p != base.p or pl.v != base.placement.v:
            return [None] * t.p
        per = [[cal.act_bytes(r, t.rows) * x for x in cal.chunk_share.get(r) or [1.0]]
               for r in range(t.p)]
    return [round(S.peak_bytes(acts, per[r])) for r, acts in enumerate(sched)]
