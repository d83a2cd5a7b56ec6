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

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.metrics import recv_split, steady
from analysis.waits import send_split

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


def _rows(run) -> int:
    sch = run.meta.get("schedule") or {}
    m = int(sch.get("microbatches") or 1)
    return int((run.meta.get("model") or {}).get("batch_size") or 0) // m


def placement(meta: dict):
    """The run's harness.schedule.Placement (meta.json's schedule: virtual, placement)."""
    from harness.schedule import Placement
    sch = meta.get("schedule") or {}
    return Placement(int(meta.get("world_size") or 1), int(sch.get("virtual") or 1),
                     sch.get("placement") or "loop")


def layer_chunk(meta: dict, layers) -> np.ndarray:
    """The rank's model chunk of each event's layer: meta.json's split gives each global stage
    its layers; the loss (layer = number of blocks) is the last stage's; -1 (opt) is chunk 0."""
    pl = placement(meta)
    layers = np.asarray(layers)
    if pl.v == 1:
        return np.zeros(len(layers), int)
    starts = np.array([lo for lo, _ in meta["split"]])
    g = np.clip(np.searchsorted(starts, layers, "right") - 1, 0, pl.stages - 1)
    return np.where(layers < 0, 0, [pl.where(int(x))[1] for x in g]).astype(int)


def action_times(events: pd.DataFrame, steps, meta: dict | None = None) -> pd.DataFrame:
    """One row per (rank, step, mb, chunk, kind) action of the given steps: wall (first start
    to last end of its spans) and busy (sum of its spans), seconds. opt/norms have mb -1.
    chunk: the rank's model chunk (from meta's split; 0 without meta or with one chunk)."""
    # only the columns used: a boolean selection copies every column it is given
    use = (events["kind"].isin(list(ACTION_OF)) & events["step"].isin(steps)).to_numpy()
    comp = events.loc[use, ["rank", "step", "mb", "layer", "kind", "start", "end"]]
    # the action of each event kind, mapped once per distinct kind; the loss forward belongs
    # to fwd, its backward is recorded as kind bwd (bwd_in) already. Grouped by the actions'
    # codes in name order (so the rows come in the order grouping by name gives), named after
    codes, kinds = pd.factorize(comp["kind"])
    act = [ACTION_OF[k] or "fwd" for k in kinds]
    names = sorted(set(act))
    k = np.array([names.index(a) for a in act], np.int64)[codes]
    chunk = layer_chunk(meta, comp["layer"]) if meta else np.zeros(len(comp), int)
    g = comp.assign(k=k, c=chunk, d=comp["end"] - comp["start"]).groupby(
        ["rank", "step", "mb", "c", "k"])
    out = g.agg(s=("start", "min"), e=("end", "max"), busy=("d", "sum")).reset_index()
    out["k"] = np.array(names, dtype=object)[out["k"].to_numpy()]
    out["wall"] = out["e"] - out["s"]
    return out.rename(columns={"k": "kind", "c": "chunk"})


def gaps(events: pd.DataFrame, acts: pd.DataFrame) -> tuple[dict, dict]:
    """Per rank: median idle before a compute action (after whatever ended last on the rank)
    and median time from a compute action's end to a communication call posted right after it
    (nothing else in between). A step's first action follows the step's bookkeeping, not the
    schedule, and is left out."""
    out, out_c = {}, {}
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
        d = d[a.duplicated(["step"]).to_numpy() & (d >= 0)]
        out[int(r)] = float(np.median(d)) if len(d) else 0.0
        dc, after_comp = _since_last_end(ends, is_comp, comm["start"].to_numpy())
        dc = dc[after_comp & (dc >= 0)]
        out_c[int(r)] = float(np.median(dc)) if len(dc) else 0.0
    return out, out_c


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
    if len(df) == 1:
        return 0.0, float(df.iloc[0] / df.index[0]) if df.index[0] else 0.0
    b, a = np.polyfit(df.index.to_numpy(float), df.to_numpy(float), 1)
    return float(a), float(b)


def calibrate(runs) -> Calibration:
    """Calibrate from one or more loaded runs (analysis.load_run) of one model and world size;
    only their steady steps are used (metrics.steady: the first complete step is warm-up)."""
    runs = list(runs)
    p = runs[0].world_size
    if any(r.world_size != p for r in runs):
        raise ValueError("calibration runs differ in world size: "
                         + ", ".join(f"{r.path}: {r.world_size}" for r in runs))
    rows_of, acts, gps, gpc, msgs, eager = [], [], [], [], [], False
    for run in runs:
        rows = _rows(run)
        if rows <= 0:
            raise ValueError(f"{run.path}: meta.json has no model.batch_size")
        _, st, _ = steady(run.steps or sorted(run.events["step"].unique()))
        a = action_times(run.events, st, run.meta).assign(rows=rows)
        acts.append(a)
        # the steady steps' sends and receives, the columns used: gaps, the splits and the
        # bytes read nothing else (a copy of every row and column costs ~10x)
        msg = (run.events["step"].isin(st) & run.events["lane"].isin(("send", "recv"))).to_numpy()
        g, gc = gaps(run.events.loc[msg, ["rank", "lane", "start", "end"]], a)
        gps.append(g)
        gpc.append(gc)
        ev = run.events.loc[msg, ["rank", "step", "mb", "kind", "pair", "start", "end", "tb",
                                  "peer", "bytes"]]
        rs = recv_split(ev)
        rs = rs[rs["matched"]].merge(ev.loc[ev["kind"] == "recv", ["pair", "bytes"]], on="pair")
        whole = rs["tb"].fillna(rs["start"]) <= rs["send_start"]   # saw the whole transfer
        rs = rs[whole] if whole.any() else rs
        msgs.append(rs[["bytes", "transfer"]].assign(rows=rows))
        ss = send_split(ev)
        eager |= bool((ss["matched"] & (ss["end"] < ss["recv_start"])).any())
        rows_of.append(rows)
    acts = pd.concat(acts, ignore_index=True)
    # per (rank, kind, rows): the mean over the steady steps and microbatches (a step adds its
    # actions up, so an occasional slow one counts; medians predicted 10-17 % short)
    wall, busy = {}, {}
    for (r, c, k), d in acts.groupby(["rank", "chunk", "kind"]):
        key = (int(r), k) + ((int(c),) if c else ())
        if k == "opt":
            wall[key] = (float(d["wall"].mean()), 0.0)
            busy[key] = (float(d["busy"].mean()), 0.0)
        elif d["rows"].nunique() > 1:
            wall[key] = _line(d["rows"], d["wall"])
            busy[key] = _line(d["rows"], d["busy"])
        else:  # one microbatch size: interpreter time fixed, layer spans proportional
            w, b, x = float(d["wall"].mean()), float(d["busy"].mean()), float(d["rows"].iloc[0])
            wall[key] = (w - b, b / x)
            busy[key] = (0.0, b / x)
    m = pd.concat(msgs, ignore_index=True)
    m = m[m["bytes"] > 0]
    lat = _line(m["bytes"], m["transfer"]) if len(m) else (0.0, 0.0)
    mb = _line(m["rows"], m["bytes"], "median") if len(m) else (0.0, 0.0)
    fixed, per_row = _activations(runs[0], rows_of[0])
    notes = [f"calibrated on {len(runs)} run(s), rows per microbatch {sorted(set(rows_of))}"]
    if len(set(rows_of)) == 1:
        notes.append("one microbatch size: compute = fixed interpreter time + layer spans "
                     "proportional to rows; message time proportional to bytes")
    return Calibration(p=p, batch=int(runs[0].meta["model"]["batch_size"]), rows=rows_of,
                       wall=wall, busy=busy,
                       gap={r: float(np.median([g.get(r, 0.0) for g in gps])) for r in range(p)},
                       gap_comm={r: float(np.median([g.get(r, 0.0) for g in gpc]))
                                 for r in range(p)},
                       latency=lat, msg_bytes=mb, act_fixed=fixed, act_per_row=per_row,
                       protocol="eager" if eager else "rendezvous", notes=notes,
                       virtual=placement(runs[0].meta).v, chunk_share=_chunk_share(runs[0]),
                       blocks={r: int(hi - lo) for r, (lo, hi) in
                               enumerate(runs[0].meta.get("split") or [])})


def _activations(run, rows: int) -> tuple[list, list]:
    """Per rank (fixed bytes, bytes per row) of one microbatch's activations (module doc)."""
    p = run.world_size
    theory = (run.meta.get("pebbles_theory") or {}).get("bytes_per_microbatch") or [0] * p
    peb = run.pebbles
    fixed, per_row = [], []
    for r in range(p):
        d = peb[peb["rank"] == r]
        if d.empty:
            fixed.append(0.0)
            per_row.append(theory[r] / rows if r < len(theory) else 0.0)
            continue
        one = d[(d["step"] == d["step"].min()) & (d["mb"] == d["mb"].min())]
        lead = one["shape"].astype(str).str.split("x").str[0]
        scales = lead.eq(str(rows)).to_numpy()
        b = one["bytes"].to_numpy(float)
        fixed.append(float(b[~scales].sum()))
        per_row.append(float(b[scales].sum()) / rows)
    return fixed, per_row


def _chunk_share(run) -> dict:
    """Per rank, each chunk's share of the bytes one microbatch leaves on the rank
    (meta.json's pebbles_theory bytes_per_chunk; equal shares without it)."""
    v = placement(run.meta).v
    per = (run.meta.get("pebbles_theory") or {}).get("bytes_per_chunk") or []
    out = {}
    for r in range(run.world_size):
        b = per[r] if r < len(per) and sum(per[r]) else [1] * v
        out[r] = [x / sum(b) for x in b]
    return out
