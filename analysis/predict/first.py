"""Activation bytes per microbatch, from each rank's first microbatch of pebbles (what the
what-if multiplies by the microbatches in flight), gathered a chunk of steps at a time.

`first`: rank -> [its first step with pebbles, {mb: (bytes whose leading dimension is not the
microbatch's rows, bytes whose is)} of that step, its lowest mb over the run]."""
from __future__ import annotations

import numpy as np


def first_pebbles(first: dict, pebbles, own, rows: int) -> None:
    """Add the pebbles of steps `own` to `first` (only the rows of a rank whose first step
    could be here; the lowest mb from every row)."""
    pst, prk = pebbles["step"].to_numpy(), pebbles["rank"].to_numpy()
    own_rows = np.isin(pst, np.asarray(sorted(own)))
    mine_rows = own_rows.copy()
    for r, f in first.items():      # lowest mb: every row; the rest: earlier steps
        mine_rows &= ~((prk == r) & (pst >= f[0]))
    for r in np.unique(prk[own_rows & ~mine_rows]).tolist():
        f = first[int(r)]
        sel = own_rows & (prk == r)
        lo_mb = int(pebbles["mb"].to_numpy()[sel].min())
        f[2] = lo_mb if f[2] is None else min(f[2], lo_mb)
    peb = pebbles[mine_rows]
    for r, d in peb.groupby("rank"):
        f = first.setdefault(int(r), [None, {}, None])
        lo_mb = int(d["mb"].min())
        f[2] = lo_mb if f[2] is None else min(f[2], lo_mb)
        step = int(d["step"].min())
        if f[0] is not None and f[0] <= step:
            continue
        one = d[d["step"] == step]
        scales = np.array([str(x).split("x", 1)[0] == str(rows) for x in one["shape"].tolist()],
                          bool)
        b = one["bytes"].to_numpy(float)
        mbs = one["mb"].to_numpy()
        f[0], f[1] = step, {int(m): (float(b[(mbs == m) & ~scales].sum()),
                                     float(b[(mbs == m) & scales].sum()))
                            for m in np.unique(mbs)}


def merge_first(first: dict, other: dict) -> None:
    """Join another chunk's `first` into `first`."""
    for r, (step, by_mb, lo_mb) in other.items():
        f = first.setdefault(r, [None, {}, None])
        f[2] = lo_mb if f[2] is None else min(f[2], lo_mb)
        if f[0] is None or step < f[0]:
            f[0], f[1] = step, by_mb
