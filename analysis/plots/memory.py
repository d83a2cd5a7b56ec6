"""Memory over the run, per rank: activation bytes held (from pebbles) above, device memory
samples (RSS on CPU; CUDA/NVML sources on GPU) below, on one time axis."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.lines import Line2D

from analysis import style
from analysis.metrics import live_bytes
from analysis.plots.common import band, columns, envelope

DASHES = {"rss": "-", "cuda_allocated": "--", "cuda_reserved": ":", "nvml_used": "-.",
          "nvml_process": (0, (1, 1))}


def memory_plot(pebbles, memory, fig=None):
    """Returns (fig, [activations axes, device axes]). A curve of more than 4 points per
    2-pixel column of the saved image is cut to what the columns show, each its lowest to
    highest value, so no peak or trough is lost: a solid one as the band it sweeps (common.band,
    a polygon ~100x cheaper to rasterise than the line), shaded light so that the ranks' bands
    show through each other, under its upper edge (the peaks) drawn as a line; a dashed one
    through its M4 envelope (common.envelope)."""
    if fig is None:
        fig = plt.figure(figsize=(style.COLUMN, 2.8))
    aax, dax = fig.subplots(2, 1, sharex=True)
    lb = live_bytes(pebbles)
    ts = [x for x in (lb["time"], memory["time"]) if len(x)]
    lo = min(x.min() for x in ts) if ts else 0.0
    hi = max(x.max() for x in ts) if ts else 1.0
    scale, unit = style.time_unit(max(hi - lo, 1e-9))
    ranks = sorted(int(r) for r in np.union1d(lb["rank"].unique(), memory["rank"].unique()))
    n = columns(fig)
    aunit = style.bytes_unit(lb["bytes"].max() if len(lb) else 1)
    lr, lt, lv = (lb[c].to_numpy() for c in ("rank", "time", "bytes"))  # sorted by rank, time
    for r in ranks:
        i, j = np.searchsorted(lr, [r, r + 1])
        if j > i:
            _curve(aax, lt[i:j], lv[i:j] * aunit[0], lo, hi, n, scale, step=True,
                   color=style.rank_color(r), label=f"rank {r}")
    aax.set_ylabel(f"activations ({aunit[1]})")
    aax.set_ylim(bottom=0)
    dunit = style.bytes_unit(memory["bytes"].max() if len(memory) else 1)
    for (r, src), d in memory.groupby(["rank", "source"]):
        _curve(dax, d["time"].to_numpy(), d["bytes"].to_numpy() * dunit[0], lo, hi, n, scale,
               color=style.rank_color(r), ls=DASHES.get(src, "-"))
    srcs = sorted(memory["source"].unique()) if len(memory) else []
    # on CPU the only source is the process's resident set; say so rather than "device"
    what = "process RSS" if srcs == ["rss"] else "memory"
    dax.set_ylabel(f"{what} ({dunit[1]})")
    dax.set_xlabel(f"time since run start ({unit})")
    handles = [Line2D([], [], color=style.rank_color(r), label=f"rank {r}") for r in ranks]
    if len(srcs) > 1:  # line styles tell sources apart only when there are several
        handles += [Line2D([], [], color="black", ls=DASHES.get(x, "-"), label=x) for x in srcs]
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 5))
    if not len(memory):
        dax.text(0.5, 0.5, "no memory samples", transform=dax.transAxes, ha="center")
    return fig, [aax, dax]


def _curve(ax, t, y, lo, hi, n, scale, step=False, ls="-", **kw):
    """A line through (t, y) on times scaled by `scale`, drawn as it would look in n columns:
    solid, as the band it sweeps per column (common.band), shaded in the line's colour, with
    its upper edge, the per-column peak, as the line; dashed (its dashes show where it is
    smooth), through its M4 envelope (common.envelope)."""
    if ls == "-" and len(t) > 4 * n:
        x, yy = band(t, y, lo, hi, n, step)
        half = len(x) // 2         # band(): the upper edge left to right, then the lower back
        pc = PolyCollection([np.c_[x * scale, yy]], facecolor=kw["color"], alpha=0.25,
                            edgecolor="none", zorder=2, gid="band")
        ax.add_collection(pc)      # (a Polygon patch's data limits take ~0.1 s to find)
        return ax.plot(x[:half] * scale, yy[:half], zorder=3, **kw)
    t, y = envelope(t, y, lo, hi, n)
    if step:
        return ax.step(t * scale, y, where="post", ls=ls, **kw)
    return ax.plot(t * scale, y, ls=ls, **kw)
