"""Memory over the run, per rank: activation bytes held (from pebbles) above, device memory
samples (RSS on CPU; CUDA/NVML sources on GPU) below, on one time axis.

`memory_plot(pebbles, memory)` draws a run held in memory. A run of any length is drawn from
`analysis.measure.decimate.MemoryCurves`, filled a time range at a time (analysis.pebble: each chunk of
steps adds its own), which cuts every curve to the figure's columns as it goes: the same
picture, in memory that does not grow with the run.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.lines import Line2D

from analysis import style
from analysis.measure.decimate import Curve, MemoryCurves
from analysis.plots.common import columns

DASHES = {"rss": "-", "cuda_allocated": "--", "cuda_reserved": ":", "nvml_used": "-.",
          "nvml_process": (0, (1, 1))}
SIZE = style.MEMORY_SIZE     # inches


def memory_plot(pebbles, memory, fig=None):
    """Returns (fig, [activations axes, device axes]) (draw_memory)."""
    if fig is None:
        fig = plt.figure(figsize=SIZE)
    return draw_memory(MemoryCurves.of(pebbles, memory, columns(fig)), fig)


def draw_memory(curves: MemoryCurves, fig=None):
    """Returns (fig, [activations axes, device axes]). A curve of more than 4 points per
    2-pixel column of the saved image is cut to what the columns show, each its lowest to
    highest value, so no peak or trough is lost: a solid one as the band it sweeps (common.band,
    a polygon ~100x cheaper to rasterise than the line), shaded light so that the ranks' bands
    show through each other, under its upper edge (the peaks) drawn as a line; a dashed one
    through its M4 envelope (common.envelope)."""
    if fig is None:
        fig = plt.figure(figsize=SIZE)
    aax, dax = fig.subplots(2, 1, sharex=True)
    lo, hi = curves.lo, curves.hi
    scale, unit = style.time_unit(max(hi - lo, 1e-9))
    ranks = sorted(set(curves.act) | {r for r, _ in curves.mem})
    aunit = style.bytes_unit(curves.amax if curves.amax is not None else 1)
    for r in ranks:
        if r in curves.act:
            _curve(aax, curves.act[r], aunit[0], scale, color=style.rank_color(r),
                   label=f"rank {r}")
    aax.set_ylabel(f"activations ({aunit[1]})")
    aax.set_ylim(bottom=0)
    dunit = style.bytes_unit(curves.dmax if curves.dmax is not None else 1)
    for (r, src) in sorted(curves.mem):
        _curve(dax, curves.mem[r, src], dunit[0], scale, color=style.rank_color(r),
               ls=DASHES.get(src, "-"))
    srcs = sorted({s for _, s in curves.mem})
    # on CPU the only source is the process's resident set; say so rather than "device"
    what = "process RSS" if srcs == ["rss"] else "memory"
    dax.set_ylabel(f"{what} ({dunit[1]})")
    dax.set_xlabel(f"time since run start ({unit})")
    handles = [Line2D([], [], color=style.rank_color(r), label=f"rank {r}") for r in ranks]
    if len(srcs) > 1:  # line styles tell sources apart only when there are several
        handles += [Line2D([], [], color="black", ls=DASHES.get(x, "-"), label=x) for x in srcs]
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 5))
    if not curves.mem:
        dax.text(0.5, 0.5, "no memory samples", transform=dax.transAxes, ha="center")
    return fig, [aax, dax]


def _curve(ax, c: Curve, yscale, scale, ls="-", **kw):
    """A curve drawn as it would look in its n columns: solid, as the band it sweeps per
    column (common.band), shaded in the line's colour, with its upper edge, the per-column peak,
    as the line; dashed (its dashes show where it is smooth), through its M4 envelope
    (common.envelope); a short one as it is."""
    if ls == "-" and c.count > 4 * c.n:
        x, yy = c.band(yscale)
        half = len(x) // 2         # band(): the upper edge left to right, then the lower back
        pc = PolyCollection([np.c_[x * scale, yy]], facecolor=kw["color"], alpha=0.25,
                            edgecolor="none", zorder=2, gid="band")
        ax.add_collection(pc)      # (a Polygon patch's data limits take ~0.1 s to find)
        return ax.plot(x[:half] * scale, yy[:half], zorder=3, **kw)
    t, y = c.envelope(yscale)
    if c.step:
        return ax.step(t * scale, y, where="post", ls=ls, **kw)
    return ax.plot(t * scale, y, ls=ls, **kw)
