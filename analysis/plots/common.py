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


def columns(fig, px: float = 2.0) -> int:
    """How many columns of `px` saved pixels the figure is wide (an upper bound for an axes):
    the n for envelope(), at the dpi the figure will be saved at."""
    dpi = plt.rcParams["savefig.dpi"]
    dpi = fig.dpi if dpi == "figure" else dpi
    return max(1, int(np.ceil(fig.get_figwidth() * dpi / px)))


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
