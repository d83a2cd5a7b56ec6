"""Values kept for the medians of a whole run, in memory or on disk, and their exact medians.

A run's summary takes medians over every steady step, action or message (metrics.py): a median
cannot be merged from the medians of parts, so the values themselves are kept. `Spill(folder)`
appends them to one file per key in `folder` (a chunk's values at a time, from any process) and
finds a median by selection: passes over the file that each narrow the range of the wanted
rank by 16 bits of the values' order-preserving integer image (radix select), until the values
left fit in a small array. Memory is that of a block of values, not of the run. Exact: the same
value np.median gives for the same values (the mean of the two middle ones for an even count).
`Spill()` keeps the values in memory instead (small runs, notebooks).

`zeros` in `median` adds that many virtual zeros to a key's values: a per-step quantity that is
0 in the steps where it does not occur (a rank that caused no idle in a step) is stored only
where it occurs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

BLOCK = 1 << 20          # values read at a time
SMALL = 1 << 18          # a range with at most this many values is selected in memory
_SIGN = np.uint64(1 << 63)


def order_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> uint64 whose unsigned order is the floats' order (-0.0 and 0.0 distinct)."""
    b = np.ascontiguousarray(x, np.float64).view(np.uint64)
    return np.where(b & _SIGN, ~b, b | _SIGN)


def from_bits(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u, np.uint64)
    return np.where(u & _SIGN, u & ~_SIGN, ~u).view(np.float64)


class Spill:
    """Named float64 value lists (module docstring). Keys are plain strings."""

    def __init__(self, folder: Path | str | None = None, tag: str = ""):
        self.folder = None if folder is None else Path(folder)
        self.tag = tag      # this writer's files are key#tag.f8: processes never share one
        self._listing = None
        self.mem: dict = defaultdict(list)
        self.n: dict = defaultdict(int)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def temporary(cls, near: Path | str):
        """A spill in a new folder inside `near` (removed by close())."""
        Path(near).mkdir(parents=True, exist_ok=True)
        return cls(tempfile.mkdtemp(prefix=".spill-", dir=near))

    def add(self, key: str, values) -> None:
        v = np.asarray(values, np.float64).ravel()
        v = v[~np.isnan(v)]
        if not len(v):
            return
        if self.folder is None:
            self.mem[key].append(v)
        else:
            self._listing = None
            with open(self._path(key), "ab") as f:
                v.tofile(f)

    def _path(self, key: str) -> Path:
        return self.folder / (key.replace(os.sep, "_") + "#" + self.tag + ".f8")

    def _files(self, key: str) -> list:
        """Every writer's file of `key` (any tag): from one listing of the folder, made at
        the first read after the last add."""
        if self._listing is None:
            self._listing = defaultdict(list)
            for p in sorted(self.folder.glob("*#*.f8")):
                self._listing[p.name[:-3].rsplit("#", 1)[0]].append(p)
        return self._listing.get(key.replace(os.sep, "_"), [])

    def count(self, key: str) -> int:
        if self.folder is None:
            return sum(len(v) for v in self.mem.get(key, ()))
        return sum(p.stat().st_size // 8 for p in self._files(key))

    def keys(self) -> list:
        if self.folder is None:
            return sorted(self.mem)
        self._files("")
        return sorted(self._listing)

    def _blocks(self, key: str):
        if self.folder is None:
            yield from self.mem.get(key, ())
            return
        for p in self._files(key):
            with open(p, "rb") as f:
                while True:
                    v = np.fromfile(f, np.float64, BLOCK)
                    if not len(v):
                        break
                    yield v

    def values(self, key: str) -> np.ndarray:
        """All of a key's values in one array (as many as the key holds: small keys only)."""
        parts = list(self._blocks(key))
        return np.concatenate(parts) if parts else np.zeros(0)

    def kth(self, key: str, k: int, zeros: int = 0) -> float:
        """The k-th smallest (0-based) of the key's values and `zeros` zeros."""
        n = self.count(key)
        if not 0 <= k < n + zeros:
            raise IndexError(f"{key}: rank {k} of {n + zeros} values")
        z = order_bits(np.zeros(1))[0]
        lo, hi, shift = np.uint64(0), np.uint64(2**64 - 1), 64   # values in [lo, hi]
        below = 0   # values under lo
        while True:
            inside = self._count_in(key, lo, hi) + (zeros if lo <= z <= hi else 0)
            if inside <= SMALL or shift == 0:
                got = [order_bits(v) for v in self._blocks(key)]
                u = np.concatenate(got) if got else np.zeros(0, np.uint64)
                u = u[(u >= lo) & (u <= hi)]
                if lo <= z <= hi:
                    u = np.r_[u, np.full(zeros, z, np.uint64)]
                u.sort()
                return float(from_bits(u[k - below]))
            shift -= 16
            counts = np.zeros(1 << 16, np.int64)
            for v in self._blocks(key):
                u = order_bits(v)
                u = u[(u >= lo) & (u <= hi)]
                counts += np.bincount(((u - lo) >> np.uint64(shift)).astype(np.int64),
                                      minlength=1 << 16)[:1 << 16]
            if lo <= z <= hi and zeros:
                counts[int((z - lo) >> np.uint64(shift))] += zeros
            c = np.cumsum(counts)
            b = int(np.searchsorted(c, k - below, "right"))
            below += int(c[b - 1]) if b else 0
            lo = lo + (np.uint64(b) << np.uint64(shift))
            hi = lo + ((np.uint64(1) << np.uint64(shift)) - np.uint64(1))

    def _count_in(self, key, lo, hi) -> int:
        if lo == 0 and hi == np.uint64(2**64 - 1):
            return self.count(key)
        return sum(int(((u >= lo) & (u <= hi)).sum()) for u in map(order_bits,
                                                                    self._blocks(key)))

    def median(self, key: str, zeros: int = 0) -> float:
        """np.median of the key's values (and `zeros` zeros); NaN if there are none."""
        n = self.count(key) + zeros
        if not n:
            return float("nan")
        if self.folder is None and not zeros:
            return float(np.median(self.values(key)))
        if n % 2:
            return self.kth(key, n // 2, zeros)
        a, b = self.kth(key, n // 2 - 1, zeros), self.kth(key, n // 2, zeros)
        return float(np.mean([a, b]))

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.mem.clear()
