"""Figure 6: the animated pebble graph, in the style of Simon Boehm's pipeline-parallel article,
driven by the measured event times of one step of a real run.

Per rank a box; inside, a row of forward ops (F<layer>, the loss on the last rank) over a row of
backward ops (B<layer>), with a pebble between each pair — the activations that layer saved for
backward — and an `opt` bar; MPI edges between neighbouring ranks (activation to the right, its
gradient back to the left). A pebble fills when its activation is stored and empties when it is
freed (with m microbatches it has m slices, one per microbatch, in the microbatch colours); the
op that runs lights up in its microbatch's colour; an edge lights up while a message is in
flight on it (its send has started, its receive has not yet completed); a clock shows the
measured time since the step's first compute.

Frames (`frame_states`): the step's *event times* are the start and end of every compute span
(fwd, bwd, loss, opt) and of every send and receive, the arrival of every message (its receive's
end), and the store and free of every pebble of the step — clipped to the step's compute window
(metrics.step_windows). Sorted, times closer than `eps` to the previous one are merged into one
*event group* (single linkage), so an op's end, the next op's start and the pebble stored
between them make one frame. Frame 0 is before the first group (nothing has run: every pebble
empty), frame k (1..G) the state right after group k, frame G+1 after the step's end (every
pebble of a correct step freed again): G + 2 frames in all.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, Rectangle, Wedge

from analysis import style
from analysis.measure.waits import recv_split
from analysis.measure.windows import COMPUTE, step_windows

FWD_Y, PEB_Y, BWD_Y, OPT_Y = 2.3, 1.45, 0.6, -0.2   # row centres, data units
BOX_W, BOX_H, PEB_R, GAP = 0.8, 0.6, 0.24, 1.6       # op box, pebble radius, space between ranks


def _window(events, step):
    ev = events[(events["step"] == step) & (events["lane"] != "step")]
    if ev.empty:
        raise ValueError(f"step {step} has no events")
    w = step_windows(ev).iloc[0]
    return ev, float(w["start"]), float(w["end"])


def event_times(events, pebbles, step) -> np.ndarray:
    """Every event time of the step (seconds), clipped to its compute window; see the module
    docstring. Sorted, with repeats."""
    ev, lo, hi = _window(events, step)
    ev = ev[ev["kind"].isin(COMPUTE + ("send", "recv"))]
    peb = pebbles[pebbles["step"] == step]
    t = np.r_[ev["start"], ev["end"], peb["stored"], peb["freed"].dropna()]
    return np.sort(np.clip(t.astype(float), lo, hi))


def event_groups(times: np.ndarray, eps: float) -> list[tuple[float, float]]:
    """(first, last) time of each group: a new group starts where the gap exceeds eps."""
    if len(times) == 0:
        return []
    cut = np.flatnonzero(np.diff(times) > eps) + 1
    return [(float(g[0]), float(g[-1])) for g in np.split(times, cut)]


def frame_states(events, pebbles, meta: dict, step: int, eps: float = 1e-4) -> list[dict]:
    """What every frame shows, as plain data (tests check it; `pebble_animation` draws it).

    Each state: t (s since the window start), fill {(rank, layer): fraction of its microbatches
    held}, held {(rank, layer): microbatches held}, ops {(rank, row, layer): microbatch running}
    (row "F" fwd/loss, "B" bwd, "opt"), edges {(from_rank, to_rank): "A"|"G"} in flight,
    status {rank: text}, dt (s until the next frame)."""
    ev, lo, hi = _window(events, step)
    peb = pebbles[(pebbles["step"] == step) & pebbles["rank"].isin(ev["rank"].unique())]
    m = int((meta.get("schedule") or {}).get("microbatches") or max(1, ev["mb"].max() + 1))
    groups = event_groups(event_times(events, pebbles, step), eps)
    comp = ev[ev["kind"].isin(COMPUTE)]
    rs = recv_split(ev)
    rs = rs[rs["matched"]]
    blocked = ev[ev["kind"].isin(("send", "recv"))]
    keys = sorted({(int(r), int(l)) for r, l in zip(peb["rank"], peb["layer"])})
    pk = list(zip(peb["rank"].astype(int), peb["layer"].astype(int)))
    stored, freed = peb["stored"].to_numpy(float), peb["freed"].to_numpy(float)
    mbs = peb["mb"].to_numpy(int)

    def state(a, b, nxt):
        """Pebbles as they are at b (after the group's changes); ops running in the frame."""
        live = (stored <= b) & ~(freed <= b)
        held = {k: set() for k in keys}
        for i in np.flatnonzero(live):
            held[pk[i]].add(int(mbs[i]))
        held = {k: tuple(sorted(v)) for k, v in held.items()}
        run = lambda s, e: ((s < nxt) & (e > b)) | ((s >= a) & (e <= b))  # noqa: E731
        ops = {}
        for k, l, r, mb in comp[run(comp["start"], comp["end"])][
                ["kind", "layer", "rank", "mb"]].itertuples(index=False):
            row = "F" if k in ("fwd", "loss") else "B" if k == "bwd" else "opt"
            ops[(int(r), row, int(l) if row != "opt" else -1)] = int(mb)
        fly = rs.loc[run(rs["send_start"], rs["end"]), ["send_rank", "rank", "pair"]]
        edges = {(int(s), int(r)): str(p)[0] for s, r, p in fly.itertuples(index=False)}
        status = {}
        for r in sorted(ev["rank"].unique()):
            mine = [(row, l, mb) for (rr, row, l), mb in ops.items() if rr == r]
            if mine:
                row, l, mb = mine[0]
                status[int(r)] = "opt" if row == "opt" else f"{_name(row, l, meta)} mb {mb}"
                continue
            bl = blocked[(blocked["rank"] == r) &
                         run(blocked["tb"].fillna(blocked["start"]), blocked["end"])]
            status[int(r)] = (f"waiting in {bl['kind'].iloc[0]}" if len(bl) else "idle")
        return {"t": b - lo, "fill": {k: len(v) / m for k, v in held.items()}, "held": held,
                "ops": ops, "edges": edges, "status": status, "dt": nxt - b}

    starts = [g[0] for g in groups] + [hi + eps]
    out = [state(lo - 2 * eps, lo - 2 * eps, lo - eps)]       # before anything: all empty
    out[0]["t"], out[0]["dt"] = 0.0, 0.0
    out += [state(a, b, starts[i + 1]) for i, (a, b) in enumerate(groups)]
    end = state(hi + 2 * eps, hi + 2 * eps, hi + 3 * eps)      # after the step
    end["t"], end["dt"] = hi - lo, 0.0
    return out + [end]


def durations(states: list[dict], hold_ms: int = 1200) -> list[int]:
    """GIF frame durations (ms): longer for frames that lasted longer in the measured step
    (clipped to 80..600 ms so nothing flashes or drags); the first and last are held."""
    span = max(s["t"] for s in states) or 1.0
    d = [int(np.clip(100 + 2000 * s["dt"] / span, 80, 600)) for s in states]
    d[0] = d[-1] = hold_ms
    return d


def _name(row, layer, meta):
    L = (meta.get("model") or {}).get("layers")
    if layer == L:
        return "loss" if row == "F" else "∂loss"
    return f"{row}{layer}"


def _columns(events, step):
    """Per rank, the layer columns to draw (in model order, the loss last)."""
    ev, _, _ = _window(events, step)
    cols = {}
    for r, d in ev[ev["kind"].isin(("fwd", "bwd", "loss"))].groupby("rank"):
        cols[int(r)] = sorted(int(l) for l in d["layer"].unique())
    return cols


def pebble_animation(states: list[dict], events, meta: dict, step: int, fig=None):
    """Draw the graph once; returns (fig, ax, update) where update(k) shows frame k."""
    cols = _columns(events, step)
    ranks = sorted(cols)
    m = max([len(v) for s in states for v in s["held"].values()] +
            [int((meta.get("schedule") or {}).get("microbatches") or 1)])
    x0, xs = 0.0, {}
    for r in ranks:
        xs[r] = {l: x0 + j for j, l in enumerate(cols[r])}
        x0 += len(cols[r]) + GAP
    width = x0 - GAP
    xlim, ylim = (-0.7, width - 0.3), (-1.2, 3.3)
    if fig is None:  # sized to the drawing (equal aspect), so no frame is mostly margin
        w_in = min(style.WIDE, 0.5 * (xlim[1] - xlim[0]))
        fig = plt.figure(figsize=(w_in, w_in * (ylim[1] - ylim[0]) / (xlim[1] - xlim[0])),
                         layout="none")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")
    boxes, wedges, edges, texts = {}, {}, {}, {}
    line = dict(color="0.6", lw=0.5, zorder=1)
    for r in ranks:
        lx, rx = min(xs[r].values()), max(xs[r].values())
        ax.add_patch(Rectangle((lx - 0.55, -0.5), rx - lx + 1.1, 3.2, fill=False, lw=0.6,
                               ec="0.3", zorder=0))
        ax.text(lx - 0.5, 2.8, f"rank {r}", va="bottom", ha="left", fontsize=7)
        texts[r] = ax.text(rx + 0.5, 2.8, "", va="bottom", ha="right", fontsize=6, color="0.25")
        for l, x in xs[r].items():
            for row, y in (("F", FWD_Y), ("B", BWD_Y)):
                b = Rectangle((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H, fc="white",
                              ec="black", lw=0.5, zorder=3)
                ax.add_patch(b)
                boxes[(r, row, l)] = b
                ax.text(x, y, _name(row, l, meta), ha="center", va="center", fontsize=6,
                        zorder=4)
            if (r, l) in states[0]["held"]:  # a pebble where this layer saved activations
                ax.plot([x, x], [FWD_Y - BOX_H / 2, PEB_Y + PEB_R], **line)
                ax.plot([x, x], [PEB_Y - PEB_R, BWD_Y + BOX_H / 2], **line)
                wedges[(r, l)] = [Wedge((x, PEB_Y), PEB_R, 90 - 360 * (k + 1) / m, 90 - 360 * k / m,
                                        fc="white", ec="0.3", lw=0.4, zorder=3) for k in range(m)]
                for w in wedges[(r, l)]:
                    ax.add_patch(w)
        for a, b in zip(list(xs[r].values())[:-1], list(xs[r].values())[1:]):
            ax.annotate("", (b - BOX_W / 2, FWD_Y), (a + BOX_W / 2, FWD_Y),
                        arrowprops=dict(arrowstyle="-|>", color="0.6", lw=0.5, mutation_scale=5))
            ax.annotate("", (a + BOX_W / 2, BWD_Y), (b - BOX_W / 2, BWD_Y),
                        arrowprops=dict(arrowstyle="-|>", color="0.6", lw=0.5, mutation_scale=5))
        o = Rectangle((lx - BOX_W / 2, OPT_Y - 0.15), rx - lx + BOX_W, 0.3, fc="white",
                      ec="black", lw=0.5, zorder=3)
        ax.add_patch(o)
        boxes[(r, "opt", -1)] = o
        ax.text((lx + rx) / 2, OPT_Y, "opt", ha="center", va="center", fontsize=6, zorder=4)
    for a, b in zip(ranks[:-1], ranks[1:]):  # MPI edges between neighbouring stages
        xa, xb = max(xs[a].values()) + BOX_W / 2, min(xs[b].values()) - BOX_W / 2
        for key, (y, p0, p1) in {(a, b): (FWD_Y, xa, xb), (b, a): (BWD_Y, xb, xa)}.items():
            e = FancyArrowPatch((p0, y), (p1, y), arrowstyle="-|>", mutation_scale=8,
                                color="0.75", lw=0.8, zorder=2)
            ax.add_patch(e)
            edges[key] = e
        ax.text((xa + xb) / 2, (FWD_Y + BWD_Y) / 2, "MPI", ha="center", va="center",
                fontsize=5.5, color="0.4")
        ax.text((xa + xb) / 2, FWD_Y + 0.12, "activation", ha="center", va="bottom",
                fontsize=5, color="0.4")
        ax.text((xa + xb) / 2, BWD_Y - 0.12, "gradient", ha="center", va="top",
                fontsize=5, color="0.4")
    clock = ax.text(-0.6, -0.65, "", ha="left", va="top", fontsize=7, family="monospace")
    if m > 1:  # which slice of a pebble is which microbatch
        ax.legend(handles=[Rectangle((0, 0), 1, 1, fc=style.mb_color(k, m), ec="0.3", lw=0.4,
                                     label=f"mb {k}") for k in range(m)],
                  loc="lower right", ncol=m, fontsize=5.5, handlelength=0.8,
                  columnspacing=0.6, borderaxespad=0.2)

    def update(k: int):
        s = states[k]
        for (r, row, l), b in boxes.items():
            mb = s["ops"].get((r, row, l))
            b.set_facecolor("white" if mb is None else
                            style.KIND["opt"] if row == "opt" else style.mb_color(mb, max(m, 1)))
            b.set_linewidth(0.5 if mb is None else 1.2)
        for key, ws in wedges.items():
            held = s["held"].get(key, ())
            for j, w in enumerate(ws):
                w.set_facecolor(style.mb_color(j, m, 0.85) if j in held else "white")
        for key, e in edges.items():
            on = key in s["edges"]
            e.set_color(style.KIND["send"] if on else "0.75")
            e.set_linewidth(1.6 if on else 0.8)
        for r, t in texts.items():
            t.set_text(s["status"].get(r, ""))
        # the frame number also keeps consecutive frames distinct (GIF writers merge equal ones)
        clock.set_text(f"t = {s['t'] * 1e3:6.1f} ms   step {step}, {_sched(meta)}   "
                       f"frame {k}/{len(states) - 1}")
        return fig
    update(0)
    return fig, ax, update


def _sched(meta):
    s = meta.get("schedule") or {}
    name = {"naive": "naive", "gpipe": "GPipe", "1f1b": "1F1B"}.get(s.get("name"), s.get("name"))
    return f"{name}, m={s.get('microbatches', 1)}" + (", overlap" if s.get("overlap") else "")
