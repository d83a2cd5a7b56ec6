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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from analysis import style
from analysis.measure.waits import recv_split, send_split
from analysis.measure.windows import COMPUTE, step_windows
from analysis.plots.common import add_boxes

LANE_GAP = 2.6  # y distance between ranks (two lanes of height ~1 plus a gap)


def _lanes(ax, ranks):
    ticks, labels = [], []
    for r in ranks:
        ticks += [r * LANE_GAP, r * LANE_GAP + 1]
        labels += [f"r{r} compute", f"r{r} comm"]
    ax.set_yticks(ticks, labels)
    ax.set_ylim(max(ranks) * LANE_GAP + 1.6, -0.6)


def timeline(events, steps=None, planned: pd.DataFrame | None = None, fig=None,
             critical: pd.DataFrame | None = None, note: str | None = None,
             span: float | None = None, title: str = "measured"):
    """Draw `steps` (default: the last three) of a run; `planned` from planned_frame().

    critical: analysis.measure.critical.critical_path segments, drawn as a black line along the path;
    note: a warning printed under the title (e.g. an unreliable clock, analysis.measure.waits);
    span: seconds the time axis shows (give two timelines the same value to compare them).
    A step starts where metrics.step_windows says (its first compute), like every metric."""
    all_steps = sorted(events["step"].unique())
    steps = all_steps[-3:] if steps is None else list(steps)
    ev = events[events["step"].isin(steps) & (events["lane"] != "step")]
    if ev.empty:
        raise ValueError(f"no events in steps {steps}")
    win = step_windows(ev)
    starts = {st: float(win.loc[st, "start"]) for st in steps if st in win.index}
    # the axis starts at the first shown step's start: a receive posted earlier (while the
    # previous step was still running upstream) is cut at the left edge
    lo, hi = min(starts.values()), ev["end"].max()
    scale, unit = style.time_unit(max(hi - lo, span or 0.0))
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
    rc = (ev["kind"] == "recompute").to_numpy()  # inside bwd: drawn over it, hatched
    if rc.any():
        add_boxes(ax, X(ev["start"][rc]), X(ev["end"][rc]), yc[rc] - 0.4, yc[rc] + 0.4,
                  gid="recompute", facecolor="none", edgecolor=style.KIND["fwd"],
                  hatch="xxxx", linewidth=0.3)
    _labels(ax, ev[comp & ev["kind"].isin(("fwd", "bwd")).to_numpy()], X, (hi - lo) * scale)
    s = send_split(ev)
    ys = s["rank"].to_numpy() * LANE_GAP + 1
    stb = s["tb"].fillna(s["start"]).to_numpy()
    s_we = stb + s["wait"].fillna(0).to_numpy()
    add_boxes(ax, X(s["start"]), X(s["end"]), ys - 0.4, ys, facecolor="none",
              edgecolor=style.KIND["send"], linewidth=0.3)
    add_boxes(ax, X(stb), X(s_we), ys - 0.4, ys, gid="send-wait", facecolor="white",
              edgecolor=style.KIND["send"], hatch="\\\\\\\\", linewidth=0.3)
    add_boxes(ax, X(s_we), X(s["end"]), ys - 0.4, ys, gid="send",
              facecolor=style.KIND["send"], edgecolor="none")
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
    for st, t0 in starts.items():
        ax.axvline(X(t0), color="black", lw=0.4, ls=":")
        ax.text(X(t0), -0.55, f" step {st}", va="bottom", ha="left", fontsize=6)
    if critical is not None and len(critical):
        _critical(ax, critical[critical["step"].isin(steps)], X)
    _lanes(ax, ranks)
    ax.set_xlim(0, X(lo + span) if span else X(hi))
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title + (f"\n{note}" if note else ""), loc="left",
                 color="black" if not note else "#B00000",
                 pad=9 if starts else None)   # above the "step N" labels over the top lane
    if planned is not None:
        ax.tick_params(axis="x", labelbottom=True)
    handles = [Patch(facecolor=style.KIND[k], label=k)
               for k in ("fwd", "bwd", "loss", "opt", "norms") if (ev["kind"] == k).any()]
    handles += [Patch(facecolor="white", edgecolor=style.KIND["send"], hatch="\\\\\\\\",
                      label="send: wait"),
                Patch(facecolor=style.KIND["send"], label="send: transfer"),
                Patch(facecolor="white", edgecolor=style.KIND["recv"], hatch="////",
                      label="recv: wait"),
                Patch(facecolor=style.KIND["recv"], label="recv: transfer")]
    if rc.any():
        handles.append(Patch(facecolor=style.KIND["bwd"], edgecolor=style.KIND["fwd"],
                             hatch="xxxx", label="bwd: recompute"))
    if critical is not None and len(critical):
        handles.append(Line2D([], [], color="black", lw=1.2, label="critical path"))
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 6))
    if pax is not None:
        _planned(pax, planned, ranks, scale, unit, [X(t) for t in starts.values()])
        return fig, [ax, pax]
    return fig, [ax]


def _critical(ax, path, X):
    """The critical path as one black line per step: along the compute lane where it computes,
    the communication lane where it transfers or waits, jumping between ranks at messages."""
    for st, seg in path.groupby("step"):
        seg = seg.sort_values("start")
        # interpreter gaps ("other") stay on the compute lane's edge, so the line stays flat
        comm = seg["kind"].isin(("transfer", "wait")).to_numpy()
        y = seg["rank"].to_numpy() * LANE_GAP + np.where(comm, 0.5, -0.5)
        xs = np.c_[X(seg["start"]), X(seg["end"])].ravel()
        ln, = ax.plot(xs, np.repeat(y, 2), color="black", lw=1.2, solid_joinstyle="miter",
                      zorder=5)
        ln.set_gid("critical-path")


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
