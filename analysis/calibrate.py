"""Costs of a pipeline, calibrated from measured runs, as a function of the microbatch size.

What the what-if (analysis/whatif.py) replays through harness.simulate. One `Calibration`
holds, per rank (stage), everything the simulator needs for any schedule and microbatch count:

- compute: per action kind (fwd incl. the loss, bwd incl. the loss backward, opt incl. the
  statistics "norms"; under split backward bwd_in incl. the loss backward, and bwd_w) and per
  model chunk of the rank (pipeline.virtual; told apart by the layers meta.json's split gives
  each global stage) the wall time of one action, first layer start to last layer end, as
  a + b·rows (rows = samples per microbatch). With runs of two or more microbatch sizes, a
  least-squares line through the medians of each size. With one run, a = the action's
  interpreter time between its layer spans (wall - busy: hooks, Python; it does not grow with
  rows) and b·rows = its layer spans (matmuls: proportional to rows). opt does not depend on rows.
  `busy` is the same for the layer spans only (what the bubble counts as compute).
- gap: the median time a rank spends between one event's end and the next compute action's
  start (the executor's loop; fixed per action), and between a compute action's end and the
  communication call that follows it.
- messages: bytes per message as a line in rows (proportional with one microbatch size), and
  seconds per message as c + k·bytes, fitted on the measured receive transfers
  (recv end - max(recv block, send start)) of the steady steps, mean per size (a busy CPU gives
  transfers a long tail that a step pays on average); with one message size in the
  runs, k = median transfer / bytes (proportional). Only receives that were already blocked
  when their send began count (when any were): a message that landed before its receive
  blocked shows the receive only the end of its transfer, often nothing (1F1B's steady
  state, the zero-bubble schedules' pre-posted receives).
- activations: per microbatch, the bytes of the pebbles (saved tensors) of one microbatch split
  into those whose leading dimension is the microbatch (they scale with rows) and the rest
  (fixed, e.g. a 4-byte loss scale); meta.json's pebbles_theory bytes_per_microbatch when the
  run has no pebbles (then all of it scales with rows).
- protocol: "eager" if some measured send returned before its receive was posted (the MPI
  library buffered it), else "rendezvous" (harness.simulate's conservative default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.spill import Spill
from analysis.stages import layer_chunk, placement
from analysis.waits import recv_split, send_split
from analysis.windows import steady

KINDS = ("fwd", "bwd", "opt", "bwd_in", "bwd_w")
# event kind -> the schedule action it belongs to (the loss runs inside the last stage's fwd
# and bwd actions, the statistics after opt)
ACTION_OF = {"fwd": "fwd", "loss": None, "bwd": "bwd", "opt": "opt", "norms": "opt",
             "bwd_in": "bwd_in", "bwd_w": "bwd_w"}


@dataclass
class Calibration:
    """Per-rank costs (seconds) as functions of rows per microbatch; see the module docstring."""
    p: int
    batch: int                      # samples per step in the calibration run(s)
    rows: list                      # rows per microbatch of each calibration run
    wall: dict                      # (rank, kind) -> (a, b): a + b*rows seconds per action
    #                                 of chunk 0; (rank, kind, chunk) for chunks 1, 2, ...
    busy: dict                      # the same keys -> (a, b): the layer spans only
    gap: dict                       # rank -> s before each compute action
    gap_comm: dict                  # rank -> s from a compute action's end to a comm call
    latency: tuple                  # (c, k): c + k*bytes seconds per message
    msg_bytes: tuple                # (fixed, per row): boundary message bytes
    act_fixed: list                 # per rank: activation bytes per microbatch, fixed part
    act_per_row: list               # per rank: ... bytes per row
    blocks: dict = field(default_factory=dict)  # rank -> model blocks on it (meta split)
    protocol: str = "rendezvous"
    notes: list = field(default_factory=list)
    virtual: int = 1                # chunks per rank in the calibration run(s)
    chunk_share: dict = field(default_factory=dict)  # rank -> each chunk's share of its bytes

    def cost(self, table: str, rank: int, kind: str, rows: float, chunk: int = 0) -> float:
        a, b = getattr(self, table).get((rank, kind) + ((chunk,) if chunk else ()), (0.0, 0.0))
        return a + b * (0.0 if kind == "opt" else rows)

    def message_s(self, rows: float) -> float:
        c, k = self.latency
        return max(0.0, c + k * self.message_bytes(rows))

    def message_bytes(self, rows: float) -> float:
        return self.msg_bytes[0] + self.msg_bytes[1] * rows

    def act_bytes(self, rank: int, rows: int) -> int:
        return round(self.act_fixed[rank] + self.act_per_row[rank] * rows)


def action_times(events: pd.DataFrame, steps, meta: dict | None = None) -> pd.DataFrame:
    """One row per (rank, step, mb, chunk, kind) action of the given steps: wall (first start
    to last end of its spans) and busy (sum of its spans), seconds. opt/norms have mb -1.
    chunk: the rank's model chunk (from meta's split; 0 without meta or with one chunk)."""
    kind = events["kind"]
    codes, kinds = pd.factorize(kind)
    # the action of each event kind, mapped once per distinct kind; the loss forward belongs
    # to fwd, its backward is recorded as kind bwd (bwd_in) already. Grouped by the actions'
    # codes in name order (so the rows come in the order grouping by name gives)
    act = [ACTION_OF.get(k, "") or "fwd" if k in ACTION_OF else None for k in kinds]
    names = sorted(set(a for a in act if a))
    k_of = np.array([names.index(a) if a else -1 for a in act] + [-1], np.int64)
    k = k_of[codes]                        # code -1 (an empty kind) takes the last slot
    use = (k >= 0) & np.isin(events["step"].to_numpy(), np.asarray(list(steps)))
    col = lambda c: events[c].to_numpy()[use]   # noqa: E731
    rank, step, mb, k = col("rank"), col("step"), col("mb"), k[use]
    start, end = col("start"), col("end")
    chunk = layer_chunk(meta, col("layer")) if meta else np.zeros(len(rank), int)
    cols = ["rank", "step", "mb", "chunk", "kind", "s", "e", "busy", "wall"]
    if not len(rank):
        return pd.DataFrame({c: [] for c in cols})
    # one sort by (rank, step, mb, chunk, action), stable: groups in the order groupby gives
    keys = (rank, step, mb, chunk, k)
    order = np.lexsort(keys[::-1])
    srt = [x[order] for x in keys]
    first = np.flatnonzero(np.r_[True, np.any([x[1:] != x[:-1] for x in srt], axis=0)])
    s_, e_, d_ = start[order], end[order], (end - start)[order]
    out = pd.DataFrame({"rank": srt[0][first], "step": srt[1][first], "mb": srt[2][first],
                        "chunk": srt[3][first],
                        "kind": np.array(names, dtype=object)[srt[4][first]],
                        "s": np.minimum.reduceat(s_, first), "e": np.maximum.reduceat(e_, first),
                        "busy": np.add.reduceat(d_, first)})
    out["wall"] = out["e"] - out["s"]
    return out


def gap_values(events: pd.DataFrame, acts: pd.DataFrame) -> dict:
    """Per rank, before taking medians: (idle before each compute action after whatever ended
    last on the rank, its action's step; time from a compute action's end to a communication
    call posted right after it (nothing else in between), its call's step). A step's first
    action follows the step's bookkeeping, not the schedule, and is left out.

    events: the send and receive events (rank, lane, step, start, end); acts: action_times."""
    out = {}
    comm_all = events[events["lane"].isin(("send", "recv"))]
    for r, a in acts.groupby("rank"):
        a = a.sort_values("s")
        comm = comm_all[comm_all["rank"] == r]
        # every end on the rank, and whether it ended a compute action
        ends = np.r_[a["e"].to_numpy(), comm["end"].to_numpy()]
        is_comp = np.r_[np.ones(len(a), bool), np.zeros(len(comm), bool)]
        o = np.argsort(ends, kind="stable")
        ends, is_comp = ends[o], is_comp[o]
        d, _ = _since_last_end(ends, is_comp, a["s"].to_numpy())
        keep = a.duplicated(["step"]).to_numpy() & (d >= 0)
        dc, after_comp = _since_last_end(ends, is_comp, comm["start"].to_numpy())
        keep_c = after_comp & (dc >= 0)
        out[int(r)] = (d[keep], a["step"].to_numpy()[keep], dc[keep_c],
                       comm["step"].to_numpy()[keep_c])
    return out


def gaps(events: pd.DataFrame, acts: pd.DataFrame) -> tuple[dict, dict]:
    """Per rank: the median of each of gap_values' two (0 without any)."""
    g = gap_values(events, acts)
    med = lambda x: float(np.median(x)) if len(x) else 0.0   # noqa: E731
    return {r: med(v[0]) for r, v in g.items()}, {r: med(v[2]) for r, v in g.items()}


def _since_last_end(ends, is_comp, t):
    """(time since the latest of `ends` at or before each t, NaN if none; was that a compute
    action's end). ends sorted."""
    k = np.searchsorted(ends, t, "right") - 1
    ok = k >= 0
    kk = np.maximum(k, 0)
    return np.where(ok, t - ends[kk], np.nan), ok & is_comp[kk]


def _line(x, y, how: str = "mean") -> tuple[float, float]:
    """(a, b) of y = a + b x through per-x means (or medians); through the origin for one x."""
    df = pd.DataFrame({"x": x, "y": y}).groupby("x")["y"].agg(how)
    return _fit(df)


def _fit(df: pd.Series) -> tuple[float, float]:
    """(a, b) through the per-x values of `df` (indexed by x); through the origin for one x."""
    if len(df) == 1:
        return 0.0, float(df.iloc[0] / df.index[0]) if df.index[0] else 0.0
    b, a = np.polyfit(df.index.to_numpy(float), df.to_numpy(float), 1)
    return float(a), float(b)


class CalStats:
    """One run's calibration statistics, added up a chunk of steps at a time (`add`), so that
    a run of any length calibrates in the memory of a chunk. What calibrate() needs of the
    steady steps: per (rank, chunk, kind) the count and sums of the actions' wall and busy
    times (means), the gaps' values (medians: kept in a Spill), per message size the count and
    sum of transfer times (means) and the message sizes' counts (their median), whether any
    send was buffered, and the pebbles of each rank's first microbatch."""

    def __init__(self, meta: dict, path, spill, key: str = "cal"):
        self.meta, self.path, self.spill, self.key = meta, str(path), spill, key
        self.p = int(meta.get("world_size") or 1)
        sch = meta.get("schedule") or {}
        self.rows = int((meta.get("model") or {}).get("batch_size") or 0) // int(
            sch.get("microbatches") or 1)
        self.act: dict = {}     # (rank, chunk, kind) -> [count, [wall sums], [busy sums]]
        self.msg = {"whole": {}, "all": {}}     # bytes -> [count, [transfer sums]]
        self.eager = self.any_whole = False
        self.first: dict = {}   # rank -> [its first step, {mb: (fixed bytes, bytes per row
        #                         times rows)} of that step, its lowest mb over the run]

    def add(self, events, pebbles, steady, own, rs=None, ss=None) -> None:
        """The statistics of steps `own` (those of them that are steady) from frames that hold
        them and their neighbours (a step's first gap follows the step before it). rs, ss:
        waits.recv_split and send_split of (at least) those steps' events, if known."""
        steady, own = set(int(s) for s in steady), set(int(s) for s in own)
        here = sorted(steady & set(int(s) for s in pd.unique(events["step"])))
        mine = sorted(steady & own)
        a = action_times(events, here, self.meta)
        msg = (events["step"].isin(here) & events["lane"].isin(("send", "recv"))).to_numpy()
        for r, (d, ds, dc, dcs) in gap_values(
                events.loc[msg, ["rank", "lane", "step", "start", "end"]], a).items():
            self.spill.add(f"{self.key}.gap.r{r}", d[np.isin(ds, mine)])
            self.spill.add(f"{self.key}.gapc.r{r}", dc[np.isin(dcs, mine)])
        a = a[a["step"].isin(mine)]
        for (r, c, k), d in a.groupby(["rank", "chunk", "kind"]):
            acc = self.act.setdefault((int(r), int(c), k), [0, [], []])
            acc[0] += len(d)
            acc[1].append(float(d["wall"].sum()))
            acc[2].append(float(d["busy"].sum()))
        if rs is None or ss is None:
            mine_msg = (events["step"].isin(mine)
                        & events["lane"].isin(("send", "recv"))).to_numpy()
            ev = events.loc[mine_msg, ["rank", "step", "mb", "kind", "pair", "start", "end",
                                       "tb", "peer", "bytes"]]
            rs, ss = recv_split(ev), send_split(ev)
        rs = rs[(rs["step"].isin(mine) & rs["matched"]).to_numpy()]
        ss = ss[ss["step"].isin(mine).to_numpy()]
        if rs["pair"].is_unique:      # each receive's own bytes
            rs = rs.reset_index(drop=True)
        else:                         # as a join on the pair id gives them (a row per match)
            rs = rs.drop(columns="bytes").merge(rs[["pair", "bytes"]], on="pair")
        whole = (rs["tb"].fillna(rs["start"]) <= rs["send_start"]).to_numpy()  # saw it all
        self.any_whole |= bool(whole.any())
        for name, sel in (("whole", whole), ("all", np.ones(len(rs), bool))):
            m = rs[sel & (rs["bytes"] > 0).to_numpy()]
            for b, t in m.groupby("bytes")["transfer"]:
                acc = self.msg[name].setdefault(int(b), [0, []])
                acc[0] += len(t)
                acc[1].append(float(t.sum()))
        self.eager |= bool((ss["matched"] & (ss["end"] < ss["recv_start"])).any())
        # each rank's first microbatch of pebbles: its first step, the run's lowest mb (only
        # the rows of a rank whose first step could be here)
        pst, prk = pebbles["step"].to_numpy(), pebbles["rank"].to_numpy()
        own_rows = np.isin(pst, np.asarray(sorted(own)))
        mine_rows = own_rows.copy()
        for r, f in self.first.items():      # lowest mb: every row; the rest: earlier steps
            mine_rows &= ~((prk == r) & (pst >= f[0]))
        for r in np.unique(prk[own_rows & ~mine_rows]).tolist():
            f = self.first[int(r)]
            sel = own_rows & (prk == r)
            lo_mb = int(pebbles["mb"].to_numpy()[sel].min())
            f[2] = lo_mb if f[2] is None else min(f[2], lo_mb)
        peb = pebbles[mine_rows]
        for r, d in peb.groupby("rank"):
            f = self.first.setdefault(int(r), [None, {}, None])
            lo_mb = int(d["mb"].min())
            f[2] = lo_mb if f[2] is None else min(f[2], lo_mb)
            step = int(d["step"].min())
            if f[0] is not None and f[0] <= step:
                continue
            one = d[d["step"] == step]
            lead = one["shape"].astype(str).str.split("x").str[0]
            scales = lead.eq(str(self.rows)).to_numpy()
            b = one["bytes"].to_numpy(float)
            mbs = one["mb"].to_numpy()
            f[0], f[1] = step, {int(m): (float(b[(mbs == m) & ~scales].sum()),
                                         float(b[(mbs == m) & scales].sum()))
                                for m in np.unique(mbs)}


    def merge(self, other: "CalStats") -> None:
        """Add another chunk's statistics of the same run (their values are in the spill)."""
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
        for r, (step, by_mb, lo_mb) in other.first.items():
            f = self.first.setdefault(r, [None, {}, None])
            f[2] = lo_mb if f[2] is None else min(f[2], lo_mb)
            if f[0] is None or step < f[0]:
                f[0], f[1] = step, by_mb


def _mean(acc) -> float:
    return math.fsum(acc[1]) / acc[0]


def calibrate(runs) -> Calibration:
    """Calibrate from one or more loaded runs (analysis.load_run) of one model and world size;
    only their steady steps are used (windows.steady: the first complete step is warm-up)."""
    stats = []
    spill = Spill()
    for i, run in enumerate(runs):
        s = CalStats(run.meta, run.path, spill, f"cal{i}")
        steps = run.steps or sorted(run.events["step"].unique())
        s.add(run.events, run.pebbles, steady(steps)[1], pd.unique(run.events["step"]))
        stats.append(s)
    return combine(stats)


def combine(stats: list) -> Calibration:
    """The Calibration of one or more runs' statistics (CalStats)."""
    p = stats[0].p
    if any(s.p != p for s in stats):
        raise ValueError("calibration runs differ in world size: "
                         + ", ".join(f"{s.path}: {s.p}" for s in stats))
    for s in stats:
        if s.rows <= 0:
            raise ValueError(f"{s.path}: meta.json has no model.batch_size")
    rows_of = [s.rows for s in stats]
    # per (rank, kind, rows): the mean over the steady steps and microbatches (a step adds its
    # actions up, so an occasional slow one counts; medians predicted 10-17 % short)
    groups = {}
    for s in stats:
        for key, acc in s.act.items():
            groups.setdefault(key, {}).setdefault(s.rows, []).append(acc)
    wall, busy = {}, {}
    for (r, c, k) in sorted(groups):
        by_rows = groups[(r, c, k)]
        mean = {x: ([sum(a[0] for a in accs), [v for a in accs for v in a[1]],
                     [v for a in accs for v in a[2]]]) for x, accs in by_rows.items()}
        key = (int(r), k) + ((int(c),) if c else ())
        if k == "opt":
            w = _mean_all(mean, 1)
            b = _mean_all(mean, 2)
            wall[key], busy[key] = (w, 0.0), (b, 0.0)
        elif len(mean) > 1:
            xs = sorted(mean)
            wall[key] = _fit(pd.Series([_mean((mean[x][0], mean[x][1])) for x in xs], xs))
            busy[key] = _fit(pd.Series([_mean((mean[x][0], mean[x][2])) for x in xs], xs))
        else:  # one microbatch size: interpreter time fixed, layer spans proportional
            (x, acc), = mean.items()
            w, b = _mean((acc[0], acc[1])), _mean((acc[0], acc[2]))
            wall[key] = (w - b, b / x)
            busy[key] = (0.0, b / x)
    per_x, counts = {}, {}
    for s in stats:
        msg = s.msg["whole"] if s.any_whole else s.msg["all"]
        for b, acc in msg.items():
            per_x.setdefault(b, [0, []])
            per_x[b][0] += acc[0]
            per_x[b][1] += acc[1]
            counts.setdefault(s.rows, {}).setdefault(b, 0)
            counts[s.rows][b] += acc[0]
    lat = _fit(pd.Series({b: _mean(per_x[b]) for b in sorted(per_x)})) if per_x else (0.0, 0.0)
    mb = _fit(pd.Series({x: _median_of_counts(counts[x]) for x in sorted(counts)})) \
        if counts else (0.0, 0.0)
    first = stats[0]
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
    notes = [f"calibrated on {len(stats)} run(s), rows per microbatch {sorted(set(rows_of))}"]
    if len(set(rows_of)) == 1:
        notes.append("one microbatch size: compute = fixed interpreter time + layer spans "
                     "proportional to rows; message time proportional to bytes")

    def gap(kind, r):
        per = []
        for s in stats:
            m = s.spill.median(f"{s.key}.{kind}.r{r}")
            per.append(0.0 if m != m else m)
        return float(np.median(per))
    meta = first.meta
    return Calibration(p=p, batch=int(meta["model"]["batch_size"]), rows=rows_of,
                       wall=wall, busy=busy,
                       gap={r: gap("gap", r) for r in range(p)},
                       gap_comm={r: gap("gapc", r) for r in range(p)},
                       latency=lat, msg_bytes=mb, act_fixed=fixed, act_per_row=per_row,
                       protocol="eager" if any(s.eager for s in stats) else "rendezvous",
                       notes=notes, virtual=placement(meta).v,
                       chunk_share=_chunk_share(meta, p),
                       blocks={r: int(hi - lo) for r, (lo, hi) in
                               enumerate(meta.get("split") or [])})


def _mean_all(mean: dict, i: int) -> float:
    """The mean over every rows size of the sums at position i (opt: one mean over all)."""
    n = sum(v[0] for v in mean.values())
    return math.fsum(x for v in mean.values() for x in v[i]) / n


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
