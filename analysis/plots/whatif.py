"""The measured step above the predicted one (analysis.whatif), on one time axis."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from analysis import style
from analysis.measure.windows import step_windows
from analysis.plots.common import add_boxes
from analysis.plots.timeline import LANE_GAP, _lanes, timeline


def predicted_lanes(ax, frame, scale: float, unit: str, title: str):
    """Per rank a compute lane (fwd, bwd, opt; a split backward's B and W in bwd's colour, W
    lighter) and a communication lane (blocking calls and waits, from post to done) of a
    simulated step (harness.simulate ops, seconds)."""
    kinds = frame["kind"].astype(str)
    yc = frame["rank"].to_numpy() * LANE_GAP
    x0, x1 = frame["start"].to_numpy() * scale, frame["end"].to_numpy() * scale
    compute = ("fwd", "bwd", "bwd_in", "bwd_w", "opt")
    for kind in compute:
        k = (kinds == kind).to_numpy()
        add_boxes(ax, x0[k], x1[k], yc[k] - 0.4, yc[k] + 0.4, gid=f"predicted-{kind}",
                  facecolor=style.KIND.get(kind, style.KIND["bwd"]), edgecolor="white",
                  linewidth=0.2, alpha=0.6 if kind == "bwd_w" else 1.0)
    comm = ~kinds.isin(compute).to_numpy() & (x1 > x0)
    send = comm & kinds.str.contains("send").to_numpy()
    recv = comm & ~send
    add_boxes(ax, x0[send], x1[send], yc[send] + 0.6, yc[send] + 1, gid="predicted-send",
              facecolor=style.KIND["send"], edgecolor="none")
    add_boxes(ax, x0[recv], x1[recv], yc[recv] + 1, yc[recv] + 1.4, gid="predicted-recv",
              facecolor=style.KIND["recv"], edgecolor="none")
    _lanes(ax, sorted(frame["rank"].unique()))
    ax.set_xlabel(f"time since the step's first compute ({unit})")
    ax.set_title(title, loc="left")


def measured_and_predicted(events, steps, frame, title: str, fig=None,
                           measured_title: str | None = None):
    """Top: timeline() of the measured `steps`; bottom: the predicted step (frame, from
    whatif.predict), both from their first compute, on the longer one's time axis."""
    ev = events[events["step"].isin(steps) & (events["lane"] != "step")]
    win = step_windows(ev)
    m_span = float(ev["end"].max() - win["start"].min())
    comp = frame["kind"].isin(("fwd", "bwd", "bwd_in", "bwd_w", "opt"))
    t0 = float(frame.loc[comp, "start"].min())
    fr = frame.assign(start=frame["start"] - t0, end=frame["end"] - t0)
    fr = fr[fr["end"] > 0].assign(start=lambda d: np.maximum(d["start"], 0.0))
    p_span = float(fr["end"].max())
    span = max(m_span, p_span)
    if fig is None:
        n = ev["rank"].nunique()
        fig = plt.figure(figsize=(style.WIDE, 1.3 + 1.1 * n))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.25, 1])
    _, axes = timeline(events, steps, fig=top, span=span,
                       title=measured_title or f"measured: step {', '.join(map(str, steps))}")
    ax = bottom.subplots(1, 1)
    scale, unit = style.time_unit(span)
    predicted_lanes(ax, fr, scale, unit, title)
    ax.set_xlim(0, span * scale)
    bottom.legend(handles=[Patch(facecolor=style.KIND[k], label=k)
                           for k in ("fwd", "bwd", "opt", "send", "recv")],
                  loc="outside lower center", ncol=5)
    return fig, axes + [ax]
