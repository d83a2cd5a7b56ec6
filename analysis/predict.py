"""A step predicted: a calibrated run's costs replayed through harness.simulate for another
schedule, microbatch count, or a faster or slower stage (what analysis.whatif prints and the
summary's `bubble_simulated` is)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.calibrate import KINDS, Calibration
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
    step_s: float                 # span: first compute start to last compute end, all ranks
    bubble: float                 # mean over ranks of (span - compute) / span
    idle: list                    # per rank, the idle share
    peak_act_bytes: list          # per rank: bytes per microbatch x most microbatches in flight
    frame: pd.DataFrame           # rank, kind, mb, start, end (s): compute without its gap
    latency_s: float
    protocol: str


def predict(cal: Calibration, schedule: str, m: int, batch: int | None = None,
            overlap: bool = False, scales=(), protocol: str | None = None,
            virtual: int | None = None) -> Prediction:
    """The step of `schedule` with m microbatches of batch/m rows, on the calibrated costs.
    virtual: chunks per rank (default the calibration run's); a chunk's actions cost what that
    chunk's cost in the calibration run (calibrate with the same placement)."""
    batch = batch or cal.batch
    if batch % m:
        raise ValueError(f"pipeline.microbatches={m}: must divide data.batch_size={batch}")
    rows = batch // m
    sched = S.build(schedule, cal.p, m, overlap, virtual=cal.virtual if virtual is None
                    else virtual)
    nxt = {}                      # (rank, action) -> the action after it on that rank
    for r, acts in enumerate(sched):
        for a, b in zip(acts, acts[1:] + [None]):
            nxt[r, a] = b

    def factor(r, kind):
        f = 1.0
        for s in scales:
            f *= s.factor if s.applies(r, kind) else 1.0
        return f

    def cost(r, a):
        if a.kind not in KINDS:
            return 0.0
        t = cal.gap.get(r, 0.0) + cal.cost("wall", r, a.kind, rows, a.chunk) * factor(r, a.kind)
        after = nxt[r, a]
        if after is not None and after.kind not in KINDS:
            t += cal.gap_comm.get(r, 0.0)   # the executor's time before its next MPI call
        return t

    lat = cal.message_s(rows)
    proto = protocol or cal.protocol
    ops = simulate(sched, cost, lat, protocol=proto)
    fr = pd.DataFrame([(o.rank, o.kind, o.mb, o.start, o.end, o.chunk) for o in ops],
                      columns=["rank", "kind", "mb", "start", "end", "chunk"])
    comp = fr["kind"].isin(KINDS).to_numpy()
    # compute proper starts after the executor's gap (drawn and counted as idle)
    fr.loc[comp, "start"] += fr.loc[comp, "rank"].map(cal.gap).fillna(0.0)
    fr.loc[comp, "end"] = fr.loc[comp, "start"] + [
        cal.cost("wall", r, k, rows, c) * factor(r, k) for r, k, c in
        zip(fr.loc[comp, "rank"], fr.loc[comp, "kind"], fr.loc[comp, "chunk"])]
    c = fr[comp]
    span = float(c["end"].max() - c["start"].min())
    busy = [sum(cal.cost("busy", r, a.kind, rows, a.chunk) * factor(r, a.kind)
                for a in acts if a.kind in KINDS) for r, acts in enumerate(sched)]
    idle = [(span - b) / span if span else 0.0 for b in busy]
    v = S.placement_of(sched).v       # a chunk-microbatch holds its chunk's share of the bytes
    share = {r: cal.chunk_share.get(r) if len(cal.chunk_share.get(r) or []) == v else [1 / v] * v
             for r in range(cal.p)}
    peak = [round(S.peak_bytes(acts, [cal.act_bytes(r, rows) * x for x in share[r]]))
            for r, acts in enumerate(sched)]
    return Prediction(schedule, m, rows, overlap, span, float(np.mean(idle)), idle, peak, fr,
                      lat, proto)
