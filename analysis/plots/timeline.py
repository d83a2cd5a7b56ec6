"""Timeline: per rank a compute lane and a communication lane over several steps, with the
planned schedule (harness.simulate on schedule.json, fed measured median durations) beside it.

Communication lane: sends in its upper half, receives in its lower half; a receive is split into
late-sender wait (hatched) and transfer (solid) — Scalasca's split — and the part of a
non-blocking receive before the rank blocked on it is an outline only.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from analysis import style
from analysis.metrics import COMPUTE, recv_split
from analysis.plots.common import add_boxes
from harness.schedule import from_json
from harness.simulate import simulate, to_frame

LANE_GAP = 2.6  # y distance between ranks (two lanes of height ~1 plus a gap)


def _lanes(ax, ranks):
    ticks, labels = [], []
    for r in ranks:
        ticks += [r * LANE_GAP, r * LANE_GAP + 1]
        labels += [f"r{r} compute", f"r{r} comm"]
    ax.set_yticks(ticks, labels)
    ax.set_ylim(max(ranks) * LANE_GAP + 1.6, -0.6)


def timeline(events, steps=None, planned: pd.DataFrame | None = None, fig=None):
    """Draw `steps` (default: the last three) of a run; `planned` from planned_frame()."""
    all_steps = sorted(events["step"].unique())
    steps = all_steps[-3:] if steps is None else list(steps)
    ev = events[events["step"].isin(steps) & (events["lane"] != "step")]
    if ev.empty:
        raise ValueError(f"no events in steps {steps}")
    lo, hi = ev["start"].min(), ev["end"].max()
    scale, unit = style.time_unit(hi - lo)
    X = lambda t: (np.asarray(t, float) - lo) * scale  # noqa: E731
    ranks = sorted(ev["rank"].unique())
    if fig is None:
        lanes = len(ranks) * (1 + (planned is not None))
        fig = plt.figure(figsize=(style.WIDE, 0.55 + 0.55 * lanes))
    if planned is not None:
        ax, pax = fig.subplots(2, 1, height_ratios=[1, 0.8], sharex=True)
    else:
        ax, pax = fig.subplots(1, 1), None
    yc = ev["rank"].to_numpy() * LANE_GAP
    comp = ev["kind"].isin(COMPUTE).to_numpy()
    for kind in ("fwd", "loss", "bwd", "opt", "norms"):
        k = comp & (ev["kind"] == kind).to_numpy()
        if k.any():
            add_boxes(ax, X(ev["start"][k]), X(ev["end"][k]), yc[k] - 0.4, yc[k] + 0.4,
                      gid=f"compute-{kind}", facecolor=style.KIND[kind], edgecolor="none")
    _labels(ax, ev[comp & ev["kind"].isin(("fwd", "bwd")).to_numpy()], X, (hi - lo) * scale)
    s = ev[ev["kind"] == "send"]
    ys = s["rank"].to_numpy() * LANE_GAP + 1
    add_boxes(ax, X(s["tb"].fillna(s["start"])), X(s["end"]), ys - 0.4, ys, gid="send",
              facecolor=style.KIND["send"], edgecolor="none")
    add_boxes(ax, X(s["start"]), X(s["end"]), ys - 0.4, ys, facecolor="none",
              edgecolor=style.KIND["send"], linewidth=0.3)
    rs = recv_split(ev)
    yr = rs["rank"].to_numpy() * LANE_GAP + 1
    tb = rs["tb"].fillna(rs["start"]).to_numpy()
    w_end = tb + rs["wait"].fillna(0).to_numpy()
    add_boxes(ax, X(rs["start"]), X(rs["end"]), yr, yr + 0.4, facecolor="none",
              edgecolor=style.KIND["recv"], linewidth=0.3)
    add_boxes(ax, X(tb), X(w_end), yr, yr + 0.4, gid="recv-wait", facecolor="white",
              edgecolor=style.KIND["recv"], hatch="////", linewidth=0.3)
    add_boxes(ax, X(w_end), X(rs["end"]), yr, yr + 0.4, gid="recv-transfer",
              facecolor=style.KIND["recv"], edgecolor="none")
    m = rs[rs["matched"]]
    y0 = m["send_rank"].to_numpy() * LANE_GAP + 1
    y1 = m["rank"].to_numpy() * LANE_GAP + 1
    x0, x1 = X(m["send_start"]), X(m["end"])
    q = ax.quiver(x0, y0, x1 - x0, y1 - y0, angles="xy", scale_units="xy", scale=1,
                  width=0.0015, headwidth=5, headlength=6, color=style.FLOW, zorder=4)
    q.set_gid("flows")
    for st in steps:
        t0 = ev.loc[ev["step"] == st, "start"].min()
        ax.axvline(X(t0), color="black", lw=0.4, ls=":")
        ax.text(X(t0), -0.55, f" step {st}", va="bottom", ha="left", fontsize=6)
    _lanes(ax, ranks)
    ax.set_xlim(0, X(hi))
    ax.set_xlabel(f"time ({unit})")
    ax.set_title("measured", loc="left")
    if planned is not None:
        ax.tick_params(axis="x", labelbottom=True)
    handles = [Patch(facecolor=style.KIND[k], label=k)
               for k in ("fwd", "bwd", "loss", "opt", "norms") if (ev["kind"] == k).any()]
    handles += [Patch(facecolor=style.KIND["send"], label="send"),
                Patch(facecolor="white", edgecolor=style.KIND["recv"], hatch="////",
                      label="recv: wait"),
                Patch(facecolor=style.KIND["recv"], label="recv: transfer")]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles))
    if pax is not None:
        starts = [X(ev.loc[ev["step"] == st, "start"].min()) for st in steps]
        _planned(pax, planned, ranks, scale, unit, starts)
        return fig, [ax, pax]
    return fig, [ax]


def _labels(ax, comp, X, xrange_units):
    """Microbatch number on each fwd/bwd block wide enough to hold it (few text artists)."""
    blk = comp.groupby(["rank", "step", "kind", "mb"]).agg(start=("start", "min"),
                                                           end=("end", "max")).reset_index()
    wide = (X(blk["end"]) - X(blk["start"])) > xrange_units / 45
    if wide.sum() > 300:  # too many to read: skip rather than clutter
        return
    for _, b in blk[wide].iterrows():
        ax.text((X(b["start"]) + X(b["end"])) / 2, b["rank"] * LANE_GAP, str(b["mb"]),
                ha="center", va="center", fontsize=5, color="white")


def _planned(ax, planned, ranks, scale, unit, starts):
    """The planned step, drawn once per shown step from that step's measured start."""
    lat = planned.attrs.get("latency", 0.0)
    n = len(planned)
    pl = pd.concat([planned] * len(starts), ignore_index=True)
    off = np.repeat(starts, n)
    x0, x1 = pl["start"].to_numpy() * scale + off, pl["end"].to_numpy() * scale + off
    kinds = pl["kind"].astype(str)
    yc = pl["rank"].to_numpy() * LANE_GAP
    for kind in ("fwd", "bwd", "opt"):
        k = (kinds == kind).to_numpy()
        add_boxes(ax, x0[k], x1[k], yc[k] - 0.4, yc[k] + 0.4, gid=f"planned-{kind}",
                  facecolor=style.KIND[kind], edgecolor="white", linewidth=0.2)
    comm = ~kinds.isin(("fwd", "bwd", "opt")).to_numpy()
    send = comm & kinds.str.contains("send").to_numpy()
    recv = comm & ~send
    add_boxes(ax, x0[send], x1[send], yc[send] + 0.6, yc[send] + 1, facecolor=style.KIND["send"],
              edgecolor="none")
    # a planned receive waits until the transfer starts, then moves bytes for `latency`
    wire = np.maximum(x0[recv], x1[recv] - lat * scale)
    add_boxes(ax, x0[recv], wire, yc[recv] + 1, yc[recv] + 1.4, facecolor="white",
              edgecolor=style.KIND["recv"], hatch="////", linewidth=0.3)
    add_boxes(ax, wire, x1[recv], yc[recv] + 1, yc[recv] + 1.4, facecolor=style.KIND["recv"],
              edgecolor="none")
    for x in starts:
        ax.axvline(x, color="black", lw=0.4, ls=":")
    _lanes(ax, [r for r in ranks if r in set(planned["rank"])] or ranks)
    ax.set_xlabel(f"time ({unit})")
    ax.set_title("planned: harness.simulate with measured median durations, from each "
                 "step's measured start", loc="left")


def planned_frame(schedule: dict | None, events) -> pd.DataFrame | None:
    """The planned step as a frame (rank, kind, mb, start, end; seconds), or None if the schedule
    or harness.simulate is missing. Durations: per rank and action kind, the median measured
    duration of that action (fwd/bwd summed over layers and loss per microbatch); wire time:
    the median measured receive transfer."""
    if not schedule:
        return None
    comp = events[events["kind"].isin(COMPUTE)]
    # the loss forward belongs to the stage's fwd action, the statistics to its opt action
    kind = comp["kind"].replace({"loss": "fwd", "norms": "opt"})
    dur = (comp.assign(k=kind, d=comp["end"] - comp["start"])
           .groupby(["rank", "step", "k", "mb"])["d"].sum()
           .groupby(["rank", "k"]).median())
    rs = recv_split(events)
    latency = float(rs["transfer"].median()) if rs["matched"].any() else 0.0

    def cost(rank, a):
        return float(dur.get((rank, a.kind), 0.0)) if a.kind in ("fwd", "bwd", "opt") else 0.0
    try:
        plan = to_frame(simulate(from_json(schedule), cost, latency))
        plan.attrs["latency"] = latency
        return plan
    except Exception:  # a schedule the simulator refuses: draw no plan rather than fail
        return None
