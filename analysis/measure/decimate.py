"""A curve of any length cut to what a figure's columns can show, built a time range at a time.

The memory figure draws, per rank, the activation bytes held and each memory source over the
whole run: millions of points for a long run. analysis.plots.common cuts such a curve to n
columns of pixels: `band` (the polygon a solid line sweeps: per column its lowest and highest
value, and its value at each column edge) and `envelope` (M4: per column the first, lowest,
highest and last sample); a curve of at most 4n samples is drawn as it is. Both are functions
of the whole curve. `Curve` computes the same arrays from consecutive pieces of the curve (each
chunk of steps hands over the samples of its own time range, in time order): per column it
keeps the extremes and the samples at the column edges, so its memory is O(n) however long
the run, and `finish` returns exactly what band / envelope / the raw samples would have
(tests/test_stream.py checks them array for array). `merge` joins two pieces' Curves (the
later after the earlier), so chunks can be cut up in parallel.
"""
from __future__ import annotations

import numpy as np

from analysis.measure.live import live_bytes


class Curve:
    """One curve over [lo, hi] for n columns; `step`: drawn as steps ("post") rather than
    straight segments between samples."""

    def __init__(self, lo: float, hi: float, n: int, step: bool = False):
        self.lo, self.hi, self.n, self.step = float(lo), float(hi), int(n), step
        self.count = 0
        self.raw_t, self.raw_y = [], []            # while count <= 4n
        self.first = self.last = None               # (t, y)
        self.at_first = None                        # y of the last sample at the first time
        w = (self.hi - self.lo) / n if self.hi > self.lo else 1.0
        self.w = w
        self.edges = self.lo + w * np.arange(0, n + 1, dtype=float)   # band's column edges
        self.le = np.full((n + 1, 2), np.nan)       # per edge: the last sample <= it (t, y)
        self.gt = np.full((n + 1, 2), np.nan)       # per edge: the first sample > it (t, y)
        self.cmax = np.full(n, -np.inf)             # per band column: extremes
        self.cmin = np.full(n, np.inf)
        # M4 (envelope): per column the global index, time and value of its first, lowest,
        # highest and last samples
        self.m4 = {k: np.full((n, 3), np.nan) for k in ("first", "min", "max", "last")}

    def add(self, t: np.ndarray, y: np.ndarray) -> None:
        """The next samples of the curve (times sorted, after every sample added before)."""
        t, y = np.asarray(t, float), np.asarray(y, float)
        if not len(t):
            return
        base = self.count
        self.count += len(t)
        if self.count <= 4 * self.n:
            self.raw_t.append(t)
            self.raw_y.append(y)
        else:
            self.raw_t, self.raw_y = None, None
        if self.first is None:
            self.first = (t[0], y[0])
            self.at_first = y[t == t[0]][-1]
        elif t[0] == self.first[0]:
            self.at_first = y[t == t[0]][-1]
        self.last = (t[-1], y[-1])
        # band: samples at the edges, extremes per column
        k = np.searchsorted(t, self.edges, "right") - 1          # last sample <= edge
        has = k >= 0
        self.le[has] = np.c_[t[k[has]], y[k[has]]]
        nxt = k + 1
        inside = (nxt < len(t)) & np.isnan(self.gt[:, 0])
        self.gt[inside] = np.c_[t[nxt[inside]], y[nxt[inside]]]
        col = np.clip(((t - self.lo) // self.w).astype(np.int64), 0, self.n - 1)
        np.maximum.at(self.cmax, col, y)
        np.minimum.at(self.cmin, col, y)
        # envelope's columns
        if self.hi > self.lo:
            c4 = np.clip(((t - self.lo) * (self.n / (self.hi - self.lo))).astype(np.int64), 0,
                         self.n - 1)
        else:
            c4 = np.zeros(len(t), np.int64)
        starts = np.flatnonzero(np.r_[True, c4[1:] != c4[:-1]])
        ends = np.r_[starts[1:], len(t)] - 1
        cols = c4[starts]
        idx = np.arange(len(t)) + base
        f, last = self.m4["first"], self.m4["last"]
        new = np.isnan(f[cols, 0])
        f[cols[new]] = np.c_[idx[starts], t[starts], y[starts]][new]
        last[cols] = np.c_[idx[ends], t[ends], y[ends]]
        count = ends - starts + 1
        for name, red in (("min", np.minimum), ("max", np.maximum)):
            ext = red.reduceat(y, starts)
            hit = np.flatnonzero(y == np.repeat(ext, count))
            # per column run, the first sample at its extreme
            run = np.searchsorted(starts, hit, "right") - 1
            firsts = hit[np.r_[True, run[1:] != run[:-1]]]
            cur = self.m4[name]
            old = cur[cols, 2]
            better = np.isnan(old) | ((ext < old) if name == "min" else (ext > old))
            cur[cols[better]] = np.c_[idx[firsts], t[firsts], y[firsts]][better]

    def merge(self, later: "Curve") -> "Curve":
        """This curve followed by `later` (the samples after this one's), as one."""
        if later.count == 0:
            return self
        if self.count == 0:
            return later
        out = self
        shift = self.count
        out.count = self.count + later.count
        if out.count <= 4 * out.n and self.raw_t is not None and later.raw_t is not None:
            out.raw_t = self.raw_t + later.raw_t
            out.raw_y = self.raw_y + later.raw_y
        else:
            out.raw_t = out.raw_y = None
        if later.first[0] == self.first[0]:
            out.at_first = later.at_first
        out.last = later.last
        has = ~np.isnan(later.le[:, 0])
        out.le[has] = later.le[has]
        fill = np.isnan(out.gt[:, 0]) & ~np.isnan(later.gt[:, 0])
        out.gt[fill] = later.gt[fill]
        np.maximum(out.cmax, later.cmax, out=out.cmax)
        np.minimum(out.cmin, later.cmin, out=out.cmin)
        lf, ll = later.m4["first"].copy(), later.m4["last"].copy()
        for a in (lf, ll):
            a[:, 0] += shift
        new = np.isnan(out.m4["first"][:, 0]) & ~np.isnan(lf[:, 0])
        out.m4["first"][new] = lf[new]
        has = ~np.isnan(ll[:, 0])
        out.m4["last"][has] = ll[has]
        for name in ("min", "max"):
            lx = later.m4[name].copy()
            lx[:, 0] += shift
            cur = out.m4[name]
            better = ~np.isnan(lx[:, 0]) & (np.isnan(cur[:, 2]) | (
                (lx[:, 2] < cur[:, 2]) if name == "min" else (lx[:, 2] > cur[:, 2])))
            cur[better] = lx[better]
        return out

    # -- the finished curve -----------------------------------------------------------------
    def raw(self):
        """The samples themselves (None once there are more than 4n)."""
        if self.raw_t is None:
            return None
        if not self.raw_t:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(self.raw_t), np.concatenate(self.raw_y)

    def band(self, scale: float = 1.0):
        """common.band(t, y * scale, lo, hi, n, step) of the whole curve."""
        n, w, lo = self.n, self.w, self.lo
        t0, tn = self.first[0], self.last[0]
        c0, c1 = (int(np.clip((x - lo) // w, 0, n - 1)) for x in (t0, tn))
        edges = lo + w * np.arange(c0, c1 + 2, dtype=float)
        edges[0], edges[-1] = t0, tn
        at = np.empty(len(edges))
        at[0], at[-1] = self.at_first * scale, self.last[1] * scale
        for j in range(1, len(edges) - 1):
            at[j] = self._at(c0 + j, edges[j], scale)
        top, bot = np.maximum(at[:-1], at[1:]), np.minimum(at[:-1], at[1:])
        cm, cn = self.cmax[c0:c1 + 1] * scale, self.cmin[c0:c1 + 1] * scale
        got = np.isfinite(cm)
        top[got] = np.maximum(top[got], cm[got])
        bot[got] = np.minimum(bot[got], cn[got])
        x = np.c_[edges[:-1], edges[1:]].ravel()
        return np.r_[x, x[::-1]], np.r_[np.repeat(top, 2), np.repeat(bot, 2)[::-1]]

    def _at(self, k: int, x: float, scale: float) -> float:
        """The curve's value at edge k (time x), as band() reads it from the samples."""
        (ta, ya), (tb, yb) = self.le[k], self.gt[k]
        if np.isnan(ta):          # before the first sample (np.interp's left value)
            return float(self.first[1] * scale)
        if self.step or np.isnan(tb):
            return float(ya * scale)
        return float(np.interp(x, [ta, tb], [ya * scale, yb * scale]))

    def envelope(self, scale: float = 1.0):
        """common.envelope(t, y * scale, lo, hi, n) of the whole curve (raw when short)."""
        r = self.raw()
        if r is not None:
            return r[0], r[1] * scale
        rows = np.concatenate([a[~np.isnan(a[:, 0])] for a in self.m4.values()])
        order = np.argsort(rows[:, 0], kind="stable")
        rows = rows[order]
        keep = np.r_[True, rows[1:, 0] != rows[:-1, 0]]
        return rows[keep, 1], rows[keep, 2] * scale


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
