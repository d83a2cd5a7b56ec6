"""A pipeline's costs, calibrated from measured runs: what the what-if replays (analysis/predict/replay.py).

The measured step time a user compares with is the median over the steady steps of the step's
span (analysis.metrics). A prediction from mean action times predicts the mean step instead,
and on a shared CPU, where a step now and then runs slow, the mean is the longer: calibrated
on means, the what-if missed its own calibration runs by +6 to +10 % (issue 22; by +30 % on a
loaded host). So the costs are kept per step: each kept steady step of the calibration run(s)
is one `StepCosts`, the prediction replays every one of them through harness.simulate and
takes the median, the same statistic as the measurement (analysis/predict/replay.py).

Per step (seconds; means over the step's actions, analysis/predict/actions.py):
- layer: per (layer, action kind) a block's busy time in one action: its spans (fwd; bwd; the
  split backward's bwd_in per layer and bwd_w per chunk on the chunk's first layer; the loss is
  layer L, in fwd and in bwd or bwd_in). Layer -1: a whole stage (per-layer tracing off).
- extra: per (rank, chunk, kind) the action's wall time less its spans (the interpreter between
  layers), and its spans' count; opt: per rank the optimizer step with its statistics.
- gap: per (rank, previous action kind, action kind) the time between the two.
- msg: per message size the transfer time, recv end - max(recv block, send start), of the
  receives that were already blocked when their send began (when any were: a message that
  landed before its receive blocked shows the receive only the end of its transfer); and
  the sender's: send end - max(send post, recv post) (eager: send end - send post), of the
  sends whose receive was posted first (when any were). A send
  can complete well after its receive (the receiver acknowledges at its next MPI call): equal
  on a quiet host (40-45 µs for 64 KiB), 75 µs against 1 ms at load 6, and the critical path
  runs through the sender's next action (a replay with one time for both missed GPipe m=2 by
  -12 %, with both by -3 %).
A run of any length keeps at most KEEP steps, every `stride`-th steady step (the stride
doubles as steps arrive), so the replay's cost and memory are bounded and chunks merge.

Also, pooled over every steady step (what the summary reports): per (rank, kind, chunk) the
mean wall and busy time as a + b·rows (`wall`, `busy`), message bytes, activation bytes per
microbatch from each rank's first microbatch of pebbles, and the MPI protocol seen ("eager"
if a send returned before its receive was posted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.measure.stages import placement
from analysis.measure.waits import recv_split, send_split
from analysis.measure.windows import steady
from analysis.predict.actions import action_gaps, action_times, layer_times, schedule_table
from analysis.predict.costs import RunFacts, StepCosts, fit
from analysis.predict.first import first_pebbles, merge_first
from harness import schedule as S

KINDS = ("fwd", "bwd", "opt", "bwd_in", "bwd_w")
KEEP = 32       # calibration steps replayed at most


@dataclass
class Calibration:
    """Per-step costs of the calibration run(s) (module docstring) and pooled summaries."""
    p: int
    batch: int                      # samples per step in the calibration run(s)
    rows: list                      # rows per microbatch of each calibration run
    runs: list                      # RunFacts per calibration run
    steps: list                     # StepCosts of the kept steps
    wall: dict                      # (rank, kind[, chunk]) -> (a, b): a + b*rows s per action
    busy: dict                      # the same keys -> (a, b): the layer spans only
    latency: tuple                  # (c, k): c + k*bytes seconds per message (pooled)
    msg_bytes: tuple                # (fixed, per row): boundary message bytes
    act_fixed: list                 # per rank: activation bytes per microbatch, fixed part
    act_per_row: list               # per rank: ... bytes per row
    blocks: dict = field(default_factory=dict)  # rank -> model blocks on it (meta split)
    protocol: str = "rendezvous"
    notes: list = field(default_factory=list)
    virtual: int = 1                # chunks per rank in the calibration run(s)
    chunk_share: dict = field(default_factory=dict)  # rank -> each chunk's share of its bytes

    def cost(self, table: str, rank: int, kind: str, rows: float, chunk: int = 0) -> float:
        """Pooled mean seconds of one action (table wall or busy) at `rows` rows."""
        a, b = getattr(self, table).get((rank, kind) + ((chunk,) if chunk else ()), (0.0, 0.0))
        return a + b * (0.0 if kind == "opt" else rows)

    def message_bytes(self, rows: float) -> float:
        return self.msg_bytes[0] + self.msg_bytes[1] * rows

    def act_bytes(self, rank: int, rows: int) -> int:
        return round(self.act_fixed[rank] + self.act_per_row[rank] * rows)


class CalStats:
    """One run's calibration statistics, added up a chunk of steps at a time (`add`), so that a
    run of any length calibrates in the memory of a chunk; `merge` joins two chunks' (in any
    order). Pooled: per (rank, chunk, kind) the count and sums of wall and busy times, per
    message size the count and sum of transfers, the message sizes' counts, whether any send
    was buffered, the pebbles of each rank's first microbatch. Per kept step: its StepCosts."""

    def __init__(self, meta: dict, path, spill=None, key: str = "cal", steady=None):
        # spill: unused (kept for the callers' signature: every value kept here is a sum, a
        # count or one of at most KEEP steps). steady: the run's steady steps, when known
        # before its chunks arrive (the one-pass analysis): the stride is then the run's from
        # the start, so every chunk computes the costs of its share of the KEEP steps only
        # (not KEEP of its own, thinned later), and the steps kept are those a whole-run
        # calibration keeps
        self.meta, self.path, self.key = meta, str(path), key
        self.p = int(meta.get("world_size") or 1)
        sch = meta.get("schedule") or {}
        self.rows = int((meta.get("model") or {}).get("batch_size") or 0) // int(
            sch.get("microbatches") or 1)
        self.act: dict = {}     # (rank, chunk, kind) -> [count, [wall sums], [busy sums]]
        self.msg = {"whole": {}, "all": {}}     # bytes -> [count, [transfer sums]]
        self.eager = self.any_whole = False
        self.first: dict = {}   # rank -> [its first step, {mb: (fixed bytes, bytes per row
        #                         times rows)} of that step, its lowest mb over the run]
        self.stride, self.kept = 1, {}          # step -> StepCosts (every stride-th step)
        if steady is not None:
            st = [int(x) for x in steady]
            while sum(x % self.stride == 0 for x in st) > KEEP:
                self.stride *= 2
        self._table = None

    def table(self) -> pd.DataFrame:
        """The run's schedule as a table (analysis.predict.actions.schedule_table), built once."""
        if self._table is None:
            sch = self.meta.get("schedule") or {}
            pl = placement(self.meta)
            sched = S.build(sch.get("name") or "naive", self.p, int(sch.get("microbatches") or 1),
                            bool(sch.get("overlap")), virtual=pl.v)
            self._table = schedule_table(sched)
        return self._table

    def add(self, events, pebbles, steady, own, rs=None, ss=None) -> None:
        """The statistics of steps `own` (those of them that are steady) from frames that hold
        them. rs, ss: waits.recv_split and send_split of (at least) those steps' events, if
        known."""
        steady, own = set(int(s) for s in steady), set(int(s) for s in own)
        mine = sorted(steady & own & set(int(s) for s in pd.unique(events["step"])))
        a = action_times(events, mine, self.meta)
        for (r, c, k), d in a.groupby(["rank", "chunk", "kind"]):
            acc = self.act.setdefault((int(r), int(c), k), [0, [], []])
            acc[0] += len(d)
            acc[1].append(float(d["wall"].sum()))
            acc[2].append(float(d["busy"].sum()))
        msg = (events["step"].isin(mine) & events["lane"].isin(("send", "recv"))).to_numpy()
        if rs is None or ss is None:
            ev = events.loc[msg, ["rank", "step", "mb", "kind", "pair", "start", "end", "tb",
                                  "peer", "bytes"]]
            rs, ss = recv_split(ev), send_split(ev)
        rs = rs[(rs["step"].isin(mine) & rs["matched"]).to_numpy()]
        ss = ss[ss["step"].isin(mine).to_numpy()]
        if rs["pair"].is_unique:      # each receive's own bytes
            rs = rs.reset_index(drop=True)
        else:                         # as a join on the pair id gives them (a row per match)
            rs = rs.drop(columns="bytes").merge(rs[["pair", "bytes"]], on="pair")
        whole = (rs["tb"].fillna(rs["start"]) <= rs["send_start"]).to_numpy()  # saw it all
        rs = rs.assign(whole=whole)[(rs["bytes"] > 0).to_numpy()]
        self.any_whole |= bool(rs["whole"].any())
        for name, m in (("whole", rs[rs["whole"]]), ("all", rs)):
            for b, t in m.groupby("bytes")["transfer"]:
                acc = self.msg[name].setdefault(int(b), [0, []])
                acc[0] += len(t)
                acc[1].append(float(t.sum()))
        self.eager |= bool((ss["matched"] & (ss["end"] < ss["recv_start"])).any())
        first_pebbles(self.first, pebbles, own, self.rows)
        keep = self._room([s for s in mine if s % self.stride == 0])
        if keep:
            self._keep_steps(events, events.loc[msg], a, rs, ss, keep)

    def _room(self, new: list) -> list:
        """The steps of `new` to keep: the stride doubles until the kept ones and these fit
        in KEEP (before any of their costs is computed)."""
        while len(self.kept) + len(new) > KEEP:
            self.stride *= 2
            new = [s for s in new if s % self.stride == 0]
            self._thin()
        return new

    def _keep_steps(self, events, comm, a, rs, ss, keep) -> None:
        """StepCosts of the steps `keep` (module docstring)."""
        # only the kept steps' rows from here on: their cost is that of KEEP steps, not of
        # the chunk's
        events = events.loc[events["step"].isin(keep).to_numpy()]
        comm = comm.loc[comm["step"].isin(keep).to_numpy()]
        a = a[a["step"].isin(keep)]
        steps = {s: StepCosts(self.key, s, self.rows, {}, {}, {}, {}, {"whole": {}, "all": {}})
                 for s in keep}
        lt = layer_times(events, keep)
        for s, layer, k, b, n in lt[["step", "layer", "kind", "busy", "n"]].itertuples(
                index=False):
            steps[s].layer[int(layer), k] = float(b / n)
        comp = a[a["kind"] != "opt"].assign(x=a["wall"] - a["busy"])
        for (s, r, c, k), x, n in comp.groupby(["step", "rank", "chunk", "kind"])[
                ["x", "spans"]].mean().itertuples():
            steps[s].extra[int(r), int(c), k] = (float(x), float(n))
        for (s, r), w in a[a["kind"] == "opt"].groupby(["step", "rank"])["wall"].mean().items():
            steps[s].opt[int(r)] = float(w)
        rs = rs[rs["step"].isin(keep).to_numpy()]
        for name, m in (("whole", rs[rs["whole"]]), ("all", rs)):
            for (s, b), t in m.groupby(["step", "bytes"])["transfer"].mean().items():
                steps[s].msg[name][int(b)] = float(t)
        # the sender's side, as the simulator times it: until its send completed, from when
        # both sides had posted (rendezvous), or from its own post (eager: the simulator's
        # sender needs no receiver). Only sends that show it: blocked since before that
        # moment (a wait entered later shows nothing), and of those the ones whose receive
        # was posted first when there are any (a receive posted mid-transfer shortens what
        # an eager sender shows)
        ss = ss[(ss["step"].isin(keep) & ss["matched"] & (ss["bytes"] > 0)).to_numpy()]
        tb = ss["tb"].fillna(ss["start"])
        both = np.maximum(ss["start"], ss["recv_start"])
        ss = ss.assign(both=ss["end"] - both, own=ss["end"] - ss["start"],
                       shows=tb <= both, shows_own=tb <= ss["start"],
                       first=ss["recv_start"] <= ss["start"])
        # per step (one group-by over the kept steps, each step's rows in their order: the
        # same means as step by step): "send" from the sends whose receive was posted first
        # when the step has any, "send_eager" from every send that shows its own post
        for s in pd.unique(ss["step"]):
            steps[s].msg["send"], steps[s].msg["send_eager"] = {}, {}
        sh = ss[ss["shows"].to_numpy()]
        first = sh["first"].to_numpy(bool)
        any_first = sh.assign(f=first).groupby("step")["f"].transform("any").to_numpy(bool)
        for name, col, d in (("send", "both", sh[first | ~any_first]),
                             ("send_eager", "own", ss[ss["shows_own"].to_numpy()])):
            for (s, b), t in d.groupby(["step", "bytes"])[col].mean().items():
                steps[s].msg[name][int(b)] = float(t)
        g = action_gaps(comm[comm["step"].isin(keep).to_numpy()], a, self.table())
        g = g.dropna(subset=["gap"])
        for (s, r, p_, k), v in g.groupby(["step", "rank", "prev", "kind"])["gap"].mean().items():
            steps[s].gap[int(r), p_, k] = float(v)
        self.kept.update(steps)

    def _thin(self) -> None:
        while len(self.kept) > KEEP:
            self.stride *= 2
            self.kept = {s: c for s, c in self.kept.items() if s % self.stride == 0}

    def merge(self, other: "CalStats") -> None:
        """Add another chunk's statistics of the same run."""
        for key, acc in other.act.items():
            mine = self.act.setdefault(key, [0, [], []])
            mine[0] += acc[0]
            mine[1] += acc[1]
            mine[2] += acc[2]
        for sel in ("whole", "all"):
            for b, acc in other.msg[sel].items():
                mine = self.msg[sel].setdefault(b, [0, []])
                mine[0] += acc[0]
                mine[1] += acc[1]
        self.eager |= other.eager
        self.any_whole |= other.any_whole
        merge_first(self.first, other.first)
        self.stride = max(self.stride, other.stride)
        self.kept = {s: c for s, c in {**self.kept, **other.kept}.items()
                     if s % self.stride == 0}
        self._thin()


def _mean(acc) -> float:
    return math.fsum(acc[1]) / acc[0]


def calibrate(runs) -> Calibration:
    """Calibrate from one or more loaded runs (analysis.load_run) of one model; only their
    steady steps are used (windows.steady: the first complete step is warm-up)."""
    stats = []
    for i, run in enumerate(runs):
        s = CalStats(run.meta, run.path, None, f"cal{i}")
        steps = run.steps or sorted(run.events["step"].unique())
        s.add(run.events, run.pebbles, steady(steps)[1], pd.unique(run.events["step"]))
        stats.append(s)
    return combine(stats)


def combine(stats: list) -> Calibration:
    """The Calibration of one or more runs' statistics (CalStats)."""
    first = stats[0]
    p = first.p
    for s in stats:
        if s.rows <= 0:
            raise ValueError(f"{s.path}: meta.json has no model.batch_size")
    rows_of = [s.rows for s in stats]
    wall, busy = _pooled_lines(stats)
    per_x, counts = {}, {}
    for s in stats:
        msg = s.msg["whole"] if s.any_whole else s.msg["all"]
        for b, acc in msg.items():
            per_x.setdefault(b, [0, []])
            per_x[b][0] += acc[0]
            per_x[b][1] += acc[1]
            counts.setdefault(s.rows, {}).setdefault(b, 0)
            counts[s.rows][b] += acc[0]
    lat = fit(pd.Series({b: _mean(per_x[b]) for b in sorted(per_x)})) if per_x else (0.0, 0.0)
    mb = fit(pd.Series({x: _median_of_counts(counts[x]) for x in sorted(counts)})) \
        if counts else (0.0, 0.0)
    theory = (first.meta.get("pebbles_theory") or {}).get("bytes_per_microbatch") or [0] * p
    fixed, per_row = [], []
    for r in range(p):
        if r in first.first:
            _, by_mb, lo_mb = first.first[r]
            fb, sb = by_mb.get(lo_mb, (0.0, 0.0))
            fixed.append(fb)
            per_row.append(sb / first.rows)
        else:
            fixed.append(0.0)
            per_row.append(theory[r] / first.rows if r < len(theory) else 0.0)
    eager = any(s.eager for s in stats)
    steps = []
    for s in stats:   # each run's steps, told apart by its any_whole choice of messages
        for c in sorted(s.kept.values(), key=lambda c: c.step):
            steps.append(c.with_messages("whole" if s.any_whole else "all",
                                         "send_eager" if eager else "send"))
    notes = [f"calibrated on {len(stats)} run(s) ({', '.join(s.path for s in stats)}), rows "
             f"per microbatch {sorted(set(rows_of))}, {len(steps)} steady steps replayed"]
    meta = first.meta
    return Calibration(p=p, batch=int(meta["model"]["batch_size"]), rows=rows_of,
                       runs=[RunFacts.of(s.meta, s.key) for s in stats], steps=steps,
                       wall=wall, busy=busy, latency=lat, msg_bytes=mb, act_fixed=fixed,
                       act_per_row=per_row,
                       protocol="eager" if eager else "rendezvous",
                       notes=notes, virtual=placement(meta).v,
                       chunk_share=_chunk_share(meta, p),
                       blocks={r: int(hi - lo) for r, (lo, hi) in
                               enumerate(meta.get("split") or [])})


def _pooled_lines(stats) -> tuple[dict, dict]:
    """Per (rank, kind[, chunk]) of the runs with the first run's world size: the pooled mean
    wall and busy time per action as a + b·rows (a line through the means of two or more
    microbatch sizes; with one, the interpreter time fixed and the spans proportional)."""
    groups = {}
    for s in stats:
        if s.p != stats[0].p:
            continue
        for key, acc in s.act.items():
            groups.setdefault(key, {}).setdefault(s.rows, []).append(acc)
    wall, busy = {}, {}
    for (r, c, k) in sorted(groups):
        mean = {x: [sum(a[0] for a in accs), [v for a in accs for v in a[1]],
                    [v for a in accs for v in a[2]]] for x, accs in groups[(r, c, k)].items()}
        key = (int(r), k) + ((int(c),) if c else ())
        if k == "opt":
            n = sum(v[0] for v in mean.values())
            wall[key] = (math.fsum(x for v in mean.values() for x in v[1]) / n, 0.0)
            busy[key] = (math.fsum(x for v in mean.values() for x in v[2]) / n, 0.0)
        elif len(mean) > 1:
            xs = sorted(mean)
            wall[key] = fit(pd.Series([_mean((mean[x][0], mean[x][1])) for x in xs], xs))
            busy[key] = fit(pd.Series([_mean((mean[x][0], mean[x][2])) for x in xs], xs))
        else:
            (x, acc), = mean.items()
            w, b = _mean((acc[0], acc[1])), _mean((acc[0], acc[2]))
            wall[key], busy[key] = (w - b, b / x), (0.0, b / x)
    return wall, busy


def _median_of_counts(counts: dict) -> float:
    """The median of values given as {value: how many times}."""
    vals = sorted(counts)
    c = np.cumsum([counts[v] for v in vals])
    n = int(c[-1])
    pick = lambda k: vals[int(np.searchsorted(c, k, "right"))]   # noqa: E731  k-th, 0-based
    if n % 2:
        return float(pick(n // 2))
    return float(np.mean([pick(n // 2 - 1), pick(n // 2)]))


def _chunk_share(meta: dict, p: int) -> dict:
    """Per rank, each chunk's share of the bytes one microbatch leaves on the rank
    (meta.json's pebbles_theory bytes_per_chunk; equal shares without it)."""
    v = placement(meta).v
    per = (meta.get("pebbles_theory") or {}).get("bytes_per_chunk") or []
    out = {}
    for r in range(p):
        b = per[r] if r < len(per) and sum(per[r]) else [1] * v
        out[r] = [x / sum(b) for x in b]
    return out


__all__ = ["Calibration", "CalStats", "KEEP", "KINDS", "action_times", "calibrate", "combine"]
