"""Small drawing helpers shared by the figures."""
from __future__ import annotations

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


def decimate(t: np.ndarray, y: np.ndarray, n: int = 4000):
    """At most ~n points of a step curve, keeping each bin's maximum (peaks must survive)."""
    if len(t) <= n:
        return t, y
    edges = np.linspace(t[0], t[-1], n + 1)
    b = np.clip(np.searchsorted(edges, t, "right") - 1, 0, n - 1)
    start = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    return t[start], np.maximum.reduceat(y, start)


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
