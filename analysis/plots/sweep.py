"""Figures 2-4 and 8-9 of the paper set, from the tables of analysis.sweep_stats (medians and
interquartile ranges over repeats). Each takes a frame and returns (fig, axes); none reads or
saves a file. Points measured with more ranks than cores are drawn hollow and footnoted: their
ranks shared cores, so their times (not their memory) are not those of a real pipeline."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from analysis import style
from harness import schedule as S

MARKER = {"naive": "s", "gpipe": "o", "1f1b": "^", "interleaved": "D", "zb_h1": "v",
          "zbv": "P", "dualpipev": "X"}
SCHED = {"naive": "naive", "gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "interleaved",
         "zb_h1": "ZB-H1", "zbv": "ZB-V", "dualpipev": "DualPipeV"}
SCHED_COLOR = {"naive": "#000000", "gpipe": style.PALETTE[0], "1f1b": style.PALETTE[1],
               "interleaved": style.PALETTE[2], "zb_h1": style.PALETTE[3],
               "zbv": style.PALETTE[5], "dualpipev": style.PALETTE[4]}
# multiplicative x offsets on the log2 m axis so error bars of schedules at one m do not overlap
NUDGE = {"naive": 1.0, "gpipe": 0.92, "1f1b": 1.08, "interleaved": 0.96, "zb_h1": 1.04,
         "zbv": 1.12, "dualpipev": 0.88}


def sched_label(s, v=1) -> str:
    """A schedule's display name, with its chunks per rank when it has several."""
    return SCHED.get(s, s) + (f" (v={int(v)})" if v and int(v) > 1 else "")
PART_STYLE = {  # figure 4 segments, bottom to top; the timeline's colours for the same things
    "compute": dict(facecolor=style.KIND["fwd"], label="compute"),
    "recv_wait": dict(facecolor="white", edgecolor=style.KIND["recv"], hatch="/////",
                      label="receive: waiting for the sender"),
    "recv_transfer": dict(facecolor=style.KIND["recv"], label="receive: transfer"),
    "send_wait": dict(facecolor="white", edgecolor=style.KIND["send"], hatch="\\\\\\\\\\",
                      label="send: waiting for the receiver"),
    "send_transfer": dict(facecolor=style.KIND["send"], label="send: transfer"),
    "other_idle": dict(facecolor=style.IDLE, label="other idle"),
}


def _p_color(p) -> str:
    """One colour per pipeline depth (p=2 the palette's first)."""
    return style.PALETTE[(int(p) - 2) % 7]


def _m_axis(ax, ms):
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.minorticks_off()
    ax.set_xlim(min(ms) / 1.35, max(ms) * 1.35)
    ax.set_xlabel("microbatches per step, m")


def _note(fig, table, cores):
    if "oversubscribed" in table and table["oversubscribed"].any():
        ps = sorted(int(p) for p in table.loc[table["oversubscribed"].astype(bool), "p"].unique())
        fig.text(0.01, 0.0, f"hollow: p={','.join(map(str, ps))} on {cores or 'fewer'} cores, "
                 f"oversubscribed (ranks share cores)", fontsize=5.5, va="top", ha="left")


def bubble_plot(table, cores: int | None = None, fig=None, by: str = "p"):
    """Bubble fraction against m, measured medians with interquartile ranges.

    by="p" (figure 2): one axes, one colour per p, marker = schedule, theory (p-1)/(m+p-1)
    as a curve (naive: (p-1)/p at m=1). by="schedule" (figure 8): one panel per p, one colour
    and marker per schedule, each schedule's own theory (harness.schedule.bubble with its v,
    equal F/B/W times) as a line of its colour, and the simulator's prediction for each
    measured point (table column bubble_sim, when present) as a small cross."""
    if by == "schedule":
        return _bubble_by_schedule(table, cores, fig)
    if fig is None:
        fig = plt.figure(figsize=(style.COLUMN, 2.4))
    ax = fig.subplots()
    ms = sorted(int(m) for m in table["m"].unique())
    mm = np.geomspace(min(ms), max(ms), 60)
    for p in sorted(table["p"].unique()):
        c = _p_color(p)
        ax.plot(mm, [S.bubble("gpipe", int(p), x) for x in mm], color=c, lw=0.8, zorder=1,
                gid=f"theory-p{p}")
        for s, d in table[table["p"] == p].groupby("schedule"):
            _measured_bubble(ax, d, s, c, f"measured-p{p}-{s}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("bubble: idle share of a step")
    _m_axis(ax, ms)
    handles = [Line2D([], [], color=_p_color(p), lw=0.8,
                      label=f"p={int(p)}, theory" + (f" {S.BUBBLE_FORMULA['gpipe']}" if i == 0
                                                      else ""))
               for i, p in enumerate(sorted(table["p"].unique()))]
    handles += [Line2D([], [], ls="", marker=MARKER.get(s, "D"), color="0.2", ms=3.5,
                       label=f"{SCHED.get(s, s)} measured") for s in _order(table["schedule"])]
    ax.legend(handles=handles, loc="upper right", ncol=1)
    _note(fig, table, cores)
    return fig, ax


def _measured_bubble(ax, d, s, c, gid):
    """Schedule s's measured bubbles (median, IQR error bars) against m, nudged sideways by
    schedule; oversubscribed runs hollow. -> the x positions drawn at."""
    x = d["m"].to_numpy(float) * NUDGE.get(s, 1.0)
    y = d["bubble"].to_numpy(float)
    err = np.vstack([y - d["bubble_q1"], d["bubble_q3"] - y])
    hollow = d["oversubscribed"].astype(bool).to_numpy()
    for h in (False, True):
        k = hollow == h
        if k.any():
            ax.errorbar(x[k], y[k], yerr=err[:, k], fmt=MARKER.get(s, "D"), ms=3.5, color=c,
                        mfc="white" if h else c, mew=0.8, elinewidth=0.7, capsize=1.5,
                        zorder=3, gid=gid)
    return x


def _order(names):
    return [s for s in SCHED if s in set(names)] + sorted(set(names) - set(SCHED))


def _v_of(table, s) -> int:
    v = table.loc[table["schedule"] == s, "v"] if "v" in table else []
    return int(v.max()) if len(v) else 1


def _bubble_by_schedule(table, cores, fig):
    ps = sorted(int(p) for p in table["p"].unique())
    if fig is None:
        fig = plt.figure(figsize=(style.WIDE if len(ps) > 1 else style.COLUMN, 2.6))
    axes = np.atleast_1d(fig.subplots(1, len(ps), sharey=True))
    ms = sorted(int(m) for m in table["m"].unique())
    mm = np.geomspace(max(2, min(ms)) if len(ms) > 1 else min(ms), max(ms), 60)
    scheds = _order(table["schedule"])
    for ax, p in zip(axes, ps):
        d = table[table["p"] == p]
        for s in scheds:
            g = d[d["schedule"] == s].sort_values("m")
            if g.empty:
                continue
            c, v = SCHED_COLOR.get(s, "0.5"), _v_of(d, s)
            if s == "naive":       # one m: the theory as a wide dash at m=1
                ax.plot([1], [S.bubble(s, p, 1)], ls="", marker="_", ms=10, mew=1.2, color=c,
                        zorder=1, gid=f"theory-p{p}-{s}")
            else:
                ax.plot(mm, [S.bubble(s, p, x, v) for x in mm], color=c, lw=0.8, zorder=1,
                        ls=(0, (4, 2)) if s == "1f1b" else "-", gid=f"theory-p{p}-{s}")
            x = _measured_bubble(ax, g, s, c, f"measured-p{p}-{s}")
            if "bubble_sim" in g and g["bubble_sim"].notna().any():
                ax.plot(x, g["bubble_sim"].to_numpy(float), ls="", marker="x", ms=3, mew=0.7,
                        color="0.15", zorder=4, gid=f"simulated-p{p}-{s}")
        over = bool(d["oversubscribed"].any())
        ax.set_title(f"p = {p}" + (f" (oversubscribed on {cores or 'fewer'} cores)" if over
                                   else ""))
        _m_axis(ax, ms)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("bubble: idle share of a step")
    hs = [Line2D([], [], color=SCHED_COLOR.get(s, "0.5"), marker=MARKER.get(s, "D"), ms=3.5,
                 lw=0.8, ls=(0, (4, 2)) if s == "1f1b" else "-",
                 label=sched_label(s, _v_of(table, s))) for s in scheds]
    hs += [Line2D([], [], ls="", marker="o", color="0.3", ms=3.5,
                  label="measured (median, IQR)"),
           Line2D([], [], color="0.3", lw=0.8, label="theory, equal F/B/W")]
    if "bubble_sim" in table and table["bubble_sim"].notna().any():
        hs.append(Line2D([], [], ls="", marker="x", ms=3, mew=0.7, color="0.15",
                         label="simulated (run's own times)"))
    # a column-wide figure takes three legend columns, a wide one five
    fig.legend(handles=hs, loc="outside upper center", ncol=3 if len(ps) == 1 else 5)
    _note(fig, table, cores)
    return fig, list(axes)


def peak_memory_plot(table, cores: int | None = None, fig=None, schedules=None):
    """Peak activation memory per stage against m, one panel per p: measured (open markers,
    median over repeats; marker = stage) on the theory (wide dashes: meta.pebbles_theory,
    bytes per chunk-microbatch x chunk-microbatches in flight, walked from the schedule), one
    colour per schedule; `schedules` picks which (default every one in the table)."""
    if schedules is not None:
        table = table[table["schedule"].isin(schedules)]
    ps = sorted(int(p) for p in table["p"].unique())
    if fig is None:
        fig = plt.figure(figsize=(style.WIDE if len(ps) > 1 else style.COLUMN, 2.4))
    axes = np.atleast_1d(fig.subplots(1, len(ps), sharey=True))
    scale, unit = style.bytes_unit(float(np.nanmax(table[["peak_act", "peak_theory"]].to_numpy())))
    stage_marker = ["o", "s", "^", "D", "v", "P", "X", "*"]
    ms = sorted(int(m) for m in table["m"].unique())
    for ax, p in zip(axes, ps):
        d = table[table["p"] == p]
        for (s, r), g in d.groupby(["schedule", "rank"]):
            g = g.sort_values("m")
            c = SCHED_COLOR.get(s, "0.5")
            x = g["m"].to_numpy(float) * NUDGE.get(s, 1.0)
            # theory: a wide dash at each m (visible for a single m too), joined thinly
            ax.plot(x, g["peak_theory"] * scale, color=c, lw=0.5, alpha=0.6, zorder=1)
            ax.plot(x, g["peak_theory"] * scale, ls="", marker="_", ms=10, mew=1.2, color=c,
                    zorder=2, gid=f"theory-p{p}-{s}-r{r}")
            ax.plot(x, g["peak_act"] * scale, ls="", marker=stage_marker[int(r) % 8], ms=3.5,
                    color=c, mfc="white", mew=0.8, zorder=3, gid=f"measured-p{p}-{s}-r{r}")
        over = bool(d["oversubscribed"].any())
        ax.set_title(f"p = {p}" + (f" (oversubscribed on {cores or 'fewer'} cores; memory is "
                                   f"unaffected)" if over else ""))
        _m_axis(ax, ms)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel(f"peak activations held ({unit})")
    hs = [Patch(color=SCHED_COLOR.get(s, "0.5"), label=sched_label(s, _v_of(table, s)))
          for s in _order(table["schedule"])]
    nst = int(table["rank"].max()) + 1
    hs += [Line2D([], [], ls="", marker=stage_marker[r % 8], ms=3.5, color="0.3", mfc="white",
                  mew=0.8, label=f"stage {r} measured") for r in range(nst)]
    hs += [Line2D([], [], ls="", marker="_", ms=10, mew=1.2, color="0.3", label="theory")]
    fig.legend(handles=hs, loc="outside upper center",
               ncol=min(len(hs), 7 if len(ps) > 1 else 4))   # column-wide: fewer columns
    return fig, list(axes)


def breakdown_plot(table, cores: int | None = None, fig=None):
    """Where a step's time goes: per (schedule, m), blocking then overlapped communication,
    one stacked bar per rank: compute, receive wait, transfer, send wait (late receiver),
    send transfer, other idle
    (medians over repeats; the bar's error line is the IQR of the step span)."""
    keys = table[["p", "schedule", "m"]].drop_duplicates()
    keys = keys.assign(o=[_order(keys["schedule"]).index(s) for s in keys["schedule"]])
    keys = keys.sort_values(["p", "o", "m"])
    if fig is None:
        fig = plt.figure(figsize=(style.WIDE, 2.5))
    ax = fig.subplots()
    scale, unit = style.time_unit(float(table["span"].max()))
    x, ticks, labels, groups = 0.0, [], [], []
    for k in keys.itertuples():
        g0 = x
        for ov in (False, True):
            d = table[(table["p"] == k.p) & (table["schedule"] == k.schedule) &
                      (table["m"] == k.m) & (table["overlap"] == ov)].sort_values("rank")
            for r in d.itertuples():
                bottom = 0.0
                for part, kw in PART_STYLE.items():
                    h = getattr(r, part) * scale
                    ax.bar(x, h, bottom=bottom, width=0.8, linewidth=0.3,
                           edgecolor=kw.get("edgecolor", "black"), gid=f"part-{part}",
                           **{k2: v for k2, v in kw.items() if k2 not in ("label", "edgecolor")})
                    bottom += h
                ax.errorbar(x, r.span * scale, yerr=[[(r.span - r.span_q1) * scale],
                                                    [(r.span_q3 - r.span) * scale]],
                            color="black", lw=0.6, capsize=1.5)
                if getattr(r, "clock_unreliable", False):   # analysis/waits.clock_quality
                    ax.text(x, r.span_q3 * scale, "!", ha="center", va="bottom",
                            color="#B00000", fontsize=7, fontweight="bold", gid="clock-flag")
                ticks.append(x)
                labels.append(f"r{r.rank}")
                x += 1
            groups.append(((g0 + x - 1) / 2, "blocking" if not ov else "overlap"))
            g0 = x = x + 0.4
        ax.text((groups[-2][0] + groups[-1][0]) / 2, -0.24,
                f"{SCHED.get(k.schedule, k.schedule)}, m={k.m}, p={k.p}",
                transform=ax.get_xaxis_transform(), ha="center", va="top")
        x += 0.8
    ax.set_xticks(ticks, labels)
    for gx, name in groups:
        ax.text(gx, -0.12, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=6)
    ax.set_ylabel(f"time per step ({unit})")
    ax.set_xlim(-0.8, x - 0.8)
    hs = [Patch(**{k: v for k, v in kw.items()}, linewidth=0.3,
                **({} if "edgecolor" in kw else {"edgecolor": "black"}))
          for kw in PART_STYLE.values()]
    fig.legend(handles=hs, loc="outside upper center", ncol=4)
    _note(fig, table, cores)
    if "clock_unreliable" in table and table["clock_unreliable"].any():
        fig.text(0.99, 0.0, "!: clock uncertainty > 10 % of the median transfer, wait/transfer "
                 "split unreliable", fontsize=5.5, va="top", ha="right", color="#B00000")
    return fig, ax
