"""Small drawing helpers shared by the figures."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.patches import PathPatch
from matplotlib.path import Path


def boxes(x0, x1, y0, y1) -> np.ndarray:
    """Rectangles as an (N, 4, 2) vertex array, for one PolyCollection (vectorised)."""
    x0, x1, y0, y1 = (np.broadcast_to(np.asarray(a, float), np.shape(x0)) for a in (x0, x1, y0, y1))
    return np.stack([np.c_[x0, y0], np.c_[x1, y0], np.c_[x1, y1], np.c_[x0, y1]], axis=1)


def add_boxes(ax, x0, x1, y0, y1, gid=None, hatch=None, **kw) -> PolyCollection:
    """Draw many rectangles as one artist (BrokenBarHCollection's replacement).

    A hatch is drawn by a second artist, one compound path over all the boxes (gid + "-hatch"):
    Agg sets a hatch up once per path, and hatching each box of a collection cost ~2 ms a box
    at 300 dpi (a second per timeline); the pattern is anchored to the canvas either way, so
    the picture is the same. The collection keeps one path per box."""
    verts = boxes(x0, x1, y0, y1)
    pc = PolyCollection(verts, closed=True, **kw)
    if gid:
        pc.set_gid(gid)
    ax.add_collection(pc, autolim=False)
    if hatch and len(verts):
        n = len(verts)
        ring = np.concatenate([verts, verts[:, :1]], axis=1).reshape(-1, 2)
        codes = np.tile([Path.MOVETO, Path.LINETO, Path.LINETO, Path.LINETO, Path.CLOSEPOLY], n)
        hp = PathPatch(Path(ring, codes), facecolor="none", hatch=hatch, linewidth=0,
                       edgecolor=kw.get("edgecolor", kw.get("color", "black")),
                       zorder=kw.get("zorder", pc.get_zorder()))
        if gid:
            hp.set_gid(gid + "-hatch")
        ax.add_artist(hp)
    return pc


def envelope(t: np.ndarray, y: np.ndarray, lo: float, hi: float, n: int):
    """A curve sampled at sorted times `t`, cut to what n columns over [lo, hi] can show.

    Per column that holds samples: its first, lowest, highest and last sample, in time order
    (M4, Jugel et al. 2014), so the band a column draws and the level carried into the next are
    the raw curve's (peaks and troughs both survive) and a curve of a million samples draws
    like the raw one from at most 4n points. For a plain or a step ("post") line."""
    if len(t) <= 4 * n:
        return t, y
    col = np.clip(((t - lo) * (n / (hi - lo))).astype(np.int64), 0, n - 1) if hi > lo else \
        np.zeros(len(t), np.int64)
    first = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
    count = np.diff(np.r_[first, len(t)])

    def first_where(hit):   # per column, the first sample where `hit` holds (one always does)
        i = np.flatnonzero(hit)
        return i[np.r_[True, col[i[1:]] != col[i[:-1]]]]
    lo_i = first_where(y == np.repeat(np.minimum.reduceat(y, first), count))
    hi_i = first_where(y == np.repeat(np.maximum.reduceat(y, first), count))
    idx = np.sort(np.c_[first, lo_i, hi_i, first + count - 1], axis=1).ravel()
    idx = idx[np.r_[True, idx[1:] != idx[:-1]]]   # a sample that is both first and lowest, ...
    return t[idx], y[idx]


def band(t: np.ndarray, y: np.ndarray, lo: float, hi: float, n: int, step: bool = False):
    """Outline of what a line through (t, y) (sorted times; step: drawn as steps "post") covers
    in each of n columns over [lo, hi]: per column, from the lowest to the highest value the
    curve takes there (its samples and its values at the column's edges). Returns (x, y) of one
    polygon, upper edge left to right, lower edge back.

    Filled and stroked with the line's width, it draws what the line would: a line through a
    million samples is a band of vertical zigzags whose stroking costs Agg ~0.1 s a curve at
    300 dpi, the polygon a few ms; peaks and troughs both stay (min/max per column)."""
    w = (hi - lo) / n if hi > lo else 1.0
    c0, c1 = (int(np.clip((x - lo) // w, 0, n - 1)) for x in (t[0], t[-1]))
    edges = lo + w * np.arange(c0, c1 + 2, dtype=float)
    edges[0], edges[-1] = t[0], t[-1]
    if step:   # the level after the last sample at or before the edge
        at = y[np.searchsorted(t, edges, "right") - 1]
    else:
        at = np.interp(edges, t, y)
    top, bot = np.maximum(at[:-1], at[1:]), np.minimum(at[:-1], at[1:])
    col = np.clip(((t - lo) // w).astype(np.int64), c0, c1) - c0
    first = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
    top[col[first]] = np.maximum(top[col[first]], np.maximum.reduceat(y, first))
    bot[col[first]] = np.minimum(bot[col[first]], np.minimum.reduceat(y, first))
    x = np.c_[edges[:-1], edges[1:]].ravel()
    return np.r_[x, x[::-1]], np.r_[np.repeat(top, 2), np.repeat(bot, 2)[::-1]]


def columns(fig, px: float = 2.0) -> int:
    """How many columns of `px` saved pixels the figure is wide (an upper bound for an axes):
    the n for envelope() and band(), at the dpi the figure will be saved at."""
    dpi = plt.rcParams["savefig.dpi"]
    dpi = fig.dpi if dpi == "figure" else dpi
    return max(1, int(np.ceil(fig.get_figwidth() * dpi / px)))


def columns_for(width_in: float, px: float = 2.0) -> int:
    """columns() of a figure `width_in` inches wide, before it exists (the current rcParams'
    savefig.dpi; "figure": figure.dpi)."""
    dpi = plt.rcParams["savefig.dpi"]
    dpi = plt.rcParams["figure.dpi"] if dpi == "figure" else dpi
    return max(1, int(np.ceil(width_in * dpi / px)))


def step_curve(lb, rank, lo, hi):
    """Live-bytes level of `rank` over [lo, hi] from metrics.live_bytes rows -> (t, bytes)."""
    d = lb[lb["rank"] == rank]
    t, b = d["time"].to_numpy(), d["bytes"].to_numpy(float)
    i0 = np.searchsorted(t, lo, "right")
    i1 = np.searchsorted(t, hi, "right")
    level0 = b[i0 - 1] if i0 > 0 else 0.0
    tt = np.r_[lo, t[i0:i1], hi]
    bb = np.r_[level0, b[i0:i1], b[i1 - 1] if i1 > i0 else level0]
    return tt, bb
