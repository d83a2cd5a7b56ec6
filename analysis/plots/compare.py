"""Figures 1 and 7: measured pebble graphs of several schedules side by side, on one time scale.

Each panel is analysis.plots.pebble.pebble_graph of one step of one run, drawn into its own
subfigure; all share the longest step's time span, so a shorter step is visibly shorter and
equal lengths mean equal times. One legend for all (the per-graph legends would repeat it).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from analysis import style
from analysis.measure.windows import step_windows
from analysis.plots.pebble import _legend, pebble_graph


def schedules_side_by_side(panels: list[dict], fig=None):
    """panels: dicts with title, events, pebbles, meta, step (one run's frames each). The
    activation panels share their scale too (when their units agree).

    Returns (fig, [axes of panel 0, axes of panel 1, ...]) — each entry is pebble_graph's list
    (one axes per rank, then the activation-bytes axes)."""
    spans, rows = [], 0
    for p in panels:
        ev = p["events"][(p["events"]["step"] == p["step"]) & (p["events"]["lane"] != "step")]
        spans.append(float(step_windows(ev)["span"].iloc[0]))
        n_layers = ev.loc[ev["kind"].isin(("fwd", "loss")), ["rank", "layer"]].drop_duplicates()
        rows = max(rows, 2 * len(n_layers) + ev["rank"].nunique())
    shown = max(spans)
    if fig is None:
        fig = plt.figure(figsize=(style.WIDE, min(9.0, 1.8 + 0.12 * rows)))
    subs = np.atleast_1d(fig.subfigures(1, len(panels), wspace=0.02))   # one panel: not a list
    out, m_max, split = [], 1, False
    for sf, p, span in zip(subs, panels, spans):
        _, axes = pebble_graph(p["events"], p["pebbles"], p["meta"], p["step"], fig=sf,
                               span=shown)
        sf.legends.clear()
        scale, unit = style.time_unit(shown)
        sf.suptitle(f"{p['title']}\nstep {span * scale:.0f} {unit}", fontsize=7)
        m_max = max(m_max, int((p["meta"].get("schedule") or {}).get("microbatches") or 1))
        split |= bool(p["events"]["kind"].eq("bwd_w").any())
        out.append(axes)
    # one activation scale too, when the graphs chose the same unit (they do for one model)
    baxes = [a[-1] for a in out]
    if len({a.get_ylabel() for a in baxes}) == 1:
        top = max(a.get_ylim()[1] for a in baxes)
        for a in baxes:
            a.set_ylim(0, top)
    _legend(fig, m_max, split)
    return fig, out
