"""Memory over the run, per rank: activation bytes held (from pebbles) above, device memory
samples (RSS on CPU; CUDA/NVML sources on GPU) below, on one time axis.

`memory_plot(pebbles, memory)` draws a run held in memory. A run of any length is drawn from
`MemoryCurves`, filled a time range at a time (analysis.pebble: each chunk of steps adds its
own), which cuts every curve to the figure's columns as it goes (analysis.decimate): the same
picture, in memory that does not grow with the run.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.lines import Line2D

from analysis import style
from analysis.decimate import Curve
from analysis.live import live_bytes
from analysis.plots.common import columns

DASHES = {"rss": "-", "cuda_allocated": "--", "cuda_reserved": ":", "nvml_used": "-.",
          "nvml_process": (0, (1, 1))}
SIZE = (style.COLUMN, 2.8)   # inches


class MemoryCurves:
    """The figure's curves over [lo, hi] for n columns: per rank the activation bytes held, per
    (rank, source) the memory samples, and their largest values (for the units)."""

    def __init__(self, lo: float, hi: float, n: int):
        self.lo, self.hi, self.n = lo, hi, n
        self.act: dict = {}       # rank -> Curve
        self.mem: dict = {}       # (rank, source) -> Curve
        self.amax = self.dmax = None

    def add(self, lb, memory) -> "MemoryCurves":
        """The next time range's rows: live_bytes rows (rank, time, bytes; sorted by rank,
        time) and memory samples (sorted by rank, source, time), all after earlier ones'."""
        lr, lt, lv = (lb[c].to_numpy() for c in ("rank", "time", "bytes"))
        for r in np.unique(lr).tolist():
            i, j = np.searchsorted(lr, [r, r + 1])
            self.act.setdefault(int(r), Curve(self.lo, self.hi, self.n, step=True)).add(
                lt[i:j], lv[i:j])
        if len(lv):
            self.amax = max(self.amax if self.amax is not None else lv.max(), lv.max())
        for (r, src), d in memory.groupby(["rank", "source"], observed=True):
            self.mem.setdefault((int(r), str(src)), Curve(self.lo, self.hi, self.n)).add(
                d["time"].to_numpy(), d["bytes"].to_numpy())
        if len(memory):
            m = memory["bytes"].max()
            self.dmax = max(self.dmax if self.dmax is not None else m, m)
        return self

    def merge(self, later: "MemoryCurves") -> "MemoryCurves":
        """This one followed by `later` (a later time range)."""
        for name in ("act", "mem"):
            mine, theirs = getattr(self, name), getattr(later, name)
            for k, c in theirs.items():
                mine[k] = mine[k].merge(c) if k in mine else c
        for name in ("amax", "dmax"):
            a, b = getattr(self, name), getattr(later, name)
            setattr(self, name, b if a is None else a if b is None else max(a, b))
        return self

    @classmethod
    def of(cls, pebbles, memory, n: int) -> "MemoryCurves":
        """A run held in memory, in one piece."""
        lb = live_bytes(pebbles)
        ts = [x for x in (lb["time"], memory["time"]) if len(x)]
        lo = min(x.min() for x in ts) if ts else 0.0
        hi = max(x.max() for x in ts) if ts else 1.0
        return cls(lo, hi, n).add(lb, memory)


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
