"""The pebble graph, measured: Simon Boehm's pipeline-parallel diagram drawn from a real step.

One panel per rank. Rows are that stage's layers in model order: forward rows (F<i>) above,
backward rows (B<i>) below, then `opt`. A pebble (an activation saved for backward) is a pale bar
in its layer's forward row from when it was stored to when it was freed, coloured by microbatch
(one sub-row per microbatch); forward and backward compute are solid boxes where they ran (under
split backward the input gradient B solid, the weight gradient W hatched, both in the B rows);
grey shading marks the rank's idle stretches (no compute); arrows join each send to its receive.
With virtual stages (pipeline.virtual) a rank's rows are the layers of all its chunks.
Under the panels: live activation bytes per rank on the same time axis.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import ConnectionPatch, Patch

from analysis import style
from analysis.measure import intervals as iv
from analysis.measure.live import live_bytes
from analysis.measure.stages import placement
from analysis.measure.waits import recv_split
from analysis.measure.windows import COMPUTE, step_windows
from analysis.plots.common import add_boxes, step_curve


BACKWARD = ("bwd", "bwd_in", "bwd_w")   # drawn in the B rows (bwd_w hatched)


def _stages_of(meta, rank) -> list:
    """The global stages (entries of meta.json's split) rank `rank` holds."""
    pl = placement(meta)
    return [pl.stage(rank, c) for c in range(pl.v)]


def _rows(ev, peb, meta, rank):
    """(layers in model order, has_opt) for one rank's panel."""
    layers = set(ev.loc[ev["kind"].isin(("fwd", "loss") + BACKWARD), "layer"].tolist())
    layers |= set(peb["layer"].tolist())
    split = meta.get("split") or []
    per_layer = any(x >= 0 for x in layers)  # per-layer tracing off: one "stage" row pair
    stages = [g for g in _stages_of(meta, rank) if g < len(split)]
    if per_layer and stages:
        for g in stages:
            layers |= set(range(*split[g]))
        L = (meta.get("model") or {}).get("layers")
        if L is not None and len(split) - 1 in stages and (ev["kind"] == "loss").any():
            layers.add(L)
    return sorted(int(x) for x in layers), bool(ev["kind"].isin(("opt", "norms")).any())


def _label(layer, meta):
    if layer < 0:
        return "stage"
    return "loss" if layer == (meta.get("model") or {}).get("layers") else str(layer)


def pebble_graph(events, pebbles, meta: dict, step: int, fig=None, span: float | None = None):
    """Draw step `step` of a run. Returns (fig, axes): one axes per rank, then the bytes axes.
    `span`: seconds the time axis shows (default the step's own); give several graphs the same
    value to draw them on one time scale."""
    ev = events[(events["step"] == step) & (events["lane"] != "step")]
    if ev.empty:
        raise ValueError(f"step {step} has no events")
    peb = pebbles[pebbles["step"] == step]
    # the step's window is that of its compute (metrics.step_windows): a receive posted early,
    # while the upstream rank is still in the previous step, is not part of this step's picture
    win = step_windows(ev).iloc[0]
    lo, hi = win["start"], win["end"]
    near = events[(events["step"] != step) & (events["end"] > lo) & (events["start"] < hi)]
    shown = max(hi - lo, span or 0.0)
    scale, unit = style.time_unit(shown)
    X = lambda t: (np.asarray(t, float) - lo) * scale  # noqa: E731  seconds -> axis units
    ranks = sorted(ev["rank"].unique())
    rows = {r: _rows(ev[ev["rank"] == r], peb[peb["rank"] == r], meta, r) for r in ranks}
    nrows = {r: 2 * len(ls) + has_opt for r, (ls, has_opt) in rows.items()}
    if fig is None:
        h = min(9.0, 0.9 + 0.1 * sum(nrows.values()) + 0.45 * len(ranks) + 0.9)
        fig = plt.figure(figsize=(style.WIDE, h))
    gs = fig.add_gridspec(len(ranks) + 1, 1,
                          height_ratios=[nrows[r] + 1.5 for r in ranks] + [5])
    axes = [fig.add_subplot(gs[0])]
    axes += [fig.add_subplot(gs[i], sharex=axes[0]) for i in range(1, len(ranks) + 1)]
    m = int(max(peb["mb"].max() + 1 if len(peb) else 1, ev["mb"].max() + 1, 1))
    rowy = {}
    for ax, r in zip(axes, ranks):
        layers, has_opt = rows[r]
        n = len(layers)
        f_row = {l: i for i, l in enumerate(layers)}
        b_row = {l: n + i for i, l in enumerate(layers)}
        rowy[r] = (f_row, b_row, n)
        er, pr = ev[ev["rank"] == r], peb[peb["rank"] == r]
        # other steps' work inside this window (ranks drift apart: rank 0 may still be in the
        # previous step's backward while rank 1 starts this one) — drawn grey, and not idle
        o = near[(near["rank"] == r) & near["kind"].isin(COMPUTE)]
        # idle: the complement of all compute in the window; stretches under 1/300 of the
        # window (interpreter gaps between layers) would only draw as hairlines, so skip them
        c = er[er["kind"].isin(COMPUTE)]
        busy = pd.concat([c[["start", "end"]], o[["start", "end"]]])
        _, gs0, ge0 = iv.gaps(np.zeros(len(busy), int), busy["start"], busy["end"], [lo], [hi])
        wide = (ge0 - gs0) > (hi - lo) / 300
        add_boxes(ax, X(gs0[wide]), X(ge0[wide]), -0.5, nrows[r] - 0.5, gid="idle",
                  facecolor=style.IDLE, edgecolor="none", zorder=0)
        oy = np.array([f_row.get(l, 0) if k in ("fwd", "loss") else
                       b_row.get(l, n) if k in BACKWARD else 2 * n
                       for k, l in zip(o["kind"], o["layer"])])
        add_boxes(ax, X(o["start"].clip(lower=lo)), X(o["end"].clip(upper=hi)), oy - 0.4,
                  oy + 0.4, gid="compute-other", facecolor="white", edgecolor=style.OTHER,
                  hatch="////", linewidth=0.3, zorder=2)
        # pebbles: stored -> freed (or to the end of the window if still held), one sub-row per mb
        hgt = 0.8 / m
        y0 = np.array([f_row.get(l, 0) for l in pr["layer"]]) - 0.4 + pr["mb"].to_numpy() * hgt
        free = pr["freed"].fillna(hi).clip(upper=hi)
        add_boxes(ax, X(pr["stored"]), X(free), y0, y0 + hgt, gid="pebbles",
                  facecolor=style.mb_colors(pr["mb"], m, 0.45), edgecolor="none",
                  zorder=1)
        # compute where it ran: forward (and loss) in F rows, backward in B rows, opt last
        kind, layer = c["kind"].to_numpy(), c["layer"].to_numpy()
        y = np.array([f_row.get(l, 0) if k in ("fwd", "loss") else
                      b_row.get(l, n) if k in BACKWARD else 2 * n for k, l in zip(kind, layer)])
        col = style.mb_colors(c["mb"], m)
        for k in ("opt", "norms"):
            col[kind == k] = to_rgba(style.KIND[k])
        w = kind == "bwd_w"      # weight gradients: hatched, so B and W tell apart
        for sel, kw in ((~w, {}), (w, {"hatch": "//////"})):
            if sel.any():
                add_boxes(ax, X(c["start"].to_numpy()[sel]), X(c["end"].to_numpy()[sel]),
                          y[sel] - 0.4, y[sel] + 0.4, gid="compute-w" if kw else "compute",
                          facecolor=col[sel], edgecolor="black",
                          linewidth=0.3, zorder=2, **kw)
        ax.axhline(n - 0.5, color="black", lw=0.4, ls=(0, (2, 2)), zorder=3)
        labels = [f"F {_label(l, meta)}" for l in layers] + [f"B {_label(l, meta)}"
                                                             for l in layers]
        labels += ["opt"] * has_opt
        ticks = np.arange(nrows[r])
        every = max(1, int(np.ceil(nrows[r] / 32)))  # keep labels legible for deep stages
        ax.set_yticks(ticks[::every], labels[::every])
        ax.set_ylim(nrows[r] - 0.5, -0.5)
        ax.set_ylabel(f"rank {r}")
        ax.tick_params(axis="x", labelbottom=False)
    _arrows(fig, axes, ranks, rowy, recv_split(ev), X, meta)
    # live activation bytes under the panels, same time axis
    bax = axes[-1]
    # only the pebbles held at some time in [lo, hi]: one freed by lo adds and takes back its
    # bytes before the window and one stored after hi comes after it, so the levels in the
    # window are those of all the rank's pebbles (at a fraction of the sort)
    held = (pebbles["stored"] <= hi) & ~(pebbles["freed"] <= lo)   # NaN freed: never freed
    lb = live_bytes(pebbles[held & pebbles["rank"].isin(ranks)])
    peak = lb["bytes"].max() if len(lb) else 0
    bscale, bunit = style.bytes_unit(peak or 1)
    for r in ranks:
        t, b = step_curve(lb, r, lo, hi)
        bax.step(X(t), b * bscale, where="post", color=style.rank_color(r), label=f"rank {r}")
    bax.set_ylabel(f"activations\n({bunit})")
    bax.set_xlabel(f"time in step {step} ({unit})")
    bax.set_ylim(bottom=0)
    bax.legend(loc="lower right", bbox_to_anchor=(1, 1), ncol=len(ranks), borderaxespad=0.1)
    axes[0].set_xlim(0, shown * scale)
    _legend(fig, m, split=bool(ev["kind"].eq("bwd_w").any()))
    return fig, axes


def _arrows(fig, axes, ranks, rowy, rs, X, meta=None):
    """One ConnectionPatch per matched send/receive pair of the step (few per step). With
    per-layer rows, an arrow leaves the row of the boundary layer it carries and enters the
    row of the layer that consumes it: with several chunks per rank the pair id's chunk
    (runformat.pair_id) and the placement say which stage's layers those are."""
    ax_of = dict(zip(ranks, axes))
    rs = rs[rs["matched"] & rs["send_rank"].isin(ranks) & rs["rank"].isin(ranks)]
    split = (meta or {}).get("split") or []
    pl = placement(meta) if meta else None

    def stage_layers(g):
        lo, hi = split[g]
        return lo, hi - 1

    def y_of(rank, pair, sending):
        f_row, b_row, n = rowy[rank]
        layers = list(f_row)
        real = [l for l in layers if l >= 0] or layers or [0]
        src, dst = (int(x) for x in pair.split(".")[2].split("c")[0].split(">"))
        bc = int(pair.split("c")[1]) if "c" in pair else 0
        if pl is not None and len(split) == pl.stages and real[0] >= 0:
            up = pl.stage(src if pair.startswith("A") else dst, bc)  # boundary's upstream stage
            if pair.startswith("A"):      # out of stage up's last forward row, into up+1's first
                return f_row.get(stage_layers(up)[1] if sending else stage_layers(up + 1)[0], 0)
            if pair.startswith("G"):      # out of up+1's first backward row, into up's last
                return b_row.get(stage_layers(up + 1)[0] if sending else stage_layers(up)[1], n)
        if pair.startswith("A"):  # activation: out of the last forward row, into the first
            return f_row.get(real[-1] if sending else real[0], 0)
        if pair.startswith("G"):  # gradient: out of the first backward row, into the last
            return b_row.get(real[0] if sending else real[-1], n)
        return n - 0.5
    for pair, s_rank, s0, r_rank, r1 in zip(rs["pair"], rs["send_rank"], rs["send_start"],
                                            rs["rank"], rs["end"]):
        s_rank, r_rank = int(s_rank), int(r_rank)
        cp = ConnectionPatch(xyA=(X(s0), y_of(s_rank, pair, True)), coordsA="data",
                             axesA=ax_of[s_rank], xyB=(X(r1), y_of(r_rank, pair, False)),
                             coordsB="data", axesB=ax_of[r_rank], arrowstyle="-|>",
                             mutation_scale=6, color=style.FLOW, lw=0.6, zorder=5)
        cp.set_gid("flow")
        fig.add_artist(cp)


def _legend(fig, m, split=False):
    shown = range(m) if m <= 8 else sorted({0, 1, m // 2, m - 2, m - 1})
    mbs = [Patch(facecolor=style.mb_color(k, m), edgecolor="black", lw=0.3, label=f"mb {k}")
           for k in shown]
    if split:   # split backward: B solid, W hatched (in the B rows)
        mbs.append(Patch(facecolor="white", edgecolor="black", hatch="//////", lw=0.3,
                         label="W (weight grad.)"))
    extra = [Patch(facecolor=style.mb_color(0, m, 0.45), label="pebble: stored → freed"),
             Patch(facecolor=style.IDLE, label="idle (no compute)"),
             Patch(facecolor="white", edgecolor=style.OTHER, hatch="////", lw=0.3,
                   label="other step's compute"),
             Line2D([], [], color=style.FLOW, lw=0.6, marker=">", ms=3, label="send → recv")]
    fig.legend(handles=mbs + extra, loc="outside upper center", ncol=min(len(mbs) + 4, 8))
