"""The seed's two lessons, each beside the correct run (issue 5; the paper's figure 5).

Both functions take tidy frames of two runs — the ablation ("bad") and the correct one
("good") — and return (fig, axes); they read and save nothing.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from analysis import style

GOOD, BAD = "-", "--"


def _runs_legend(fig, good_label, bad_label, ranks):
    handles = [Line2D([], [], color="black", ls=GOOD, label=good_label),
               Line2D([], [], color="black", ls=BAD, label=bad_label)]
    handles += [Line2D([], [], color=style.rank_color(r), label=f"stage {r}") for r in ranks]
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 4))


def requires_grad_lesson(good_stats, bad_stats, fig=None):
    """Loss over steps of both runs (left) and each stage's weight-update norm (right).

    Without requires_grad on the received activation every stage but the last gets zero
    gradient: its update norm is exactly 0 (drawn on a symlog axis so 0 is visible), while the
    last stage still learns — only part of the model trains and the loss falls more slowly."""
    if fig is None:
        fig = plt.figure(figsize=(style.WIDE, 2.3))
    ax_loss, ax_upd = fig.subplots(1, 2)
    ranks = sorted(set(good_stats["rank"]) | set(bad_stats["rank"]))
    for stats, ls in ((good_stats, GOOD), (bad_stats, BAD)):
        loss = stats.dropna(subset=["loss"]).sort_values("step")
        ax_loss.plot(loss["step"], loss["loss"], color="black", ls=ls)
        for r in ranks:
            d = stats[stats["rank"] == r].sort_values("step")
            ax_upd.plot(d["step"], d["update_norm"], color=style.rank_color(r), ls=ls)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_upd.set_xlabel("step")
    ax_upd.set_ylabel("weight-update norm ‖Δw‖₂")
    # symlog: linear near 0 so an update of exactly 0 sits on the axis, log above
    nonzero = good_stats.loc[good_stats["update_norm"] > 0, "update_norm"]
    ax_upd.set_yscale("symlog", linthresh=float(nonzero.min()) if len(nonzero) else 1e-6)
    ax_upd.set_ylim(bottom=0)
    frozen = [r for r in ranks if (bad_stats.loc[bad_stats["rank"] == r, "update_norm"] == 0).all()]
    if frozen:
        ax_upd.annotate(f"stage{'s' if len(frozen) > 1 else ''} "
                        f"{', '.join(map(str, frozen))} without requires_grad: exactly 0",
                        xy=(0.02, 0.02), xycoords="axes fraction", va="bottom", fontsize=6)
    _runs_legend(fig, "correct: receiver sets requires_grad", "requires_grad missing", ranks)
    return fig, [ax_loss, ax_upd]


def detach_lesson(good_mem, bad_mem, fig=None):
    """Activation bytes held (from pebbles, left) and process memory (right) at the end of
    each step, per stage, for both runs (frames from metrics.memory_by_step). Keeping outputs
    attached to past graphs makes both grow every step; the correct run stays flat."""
    if fig is None:
        fig = plt.figure(figsize=(style.WIDE, 2.3))
    ax_act, ax_mem = fig.subplots(1, 2, sharex=True)
    ranks = sorted(set(good_mem["rank"]) | set(bad_mem["rank"]))
    src = next((s for s in ("nvml_process", "cuda_allocated", "rss") if s in good_mem), None)
    peak = max(bad_mem["act_bytes"].max(), good_mem["act_bytes"].max(), 1)
    aunit = style.bytes_unit(peak)
    munit = style.bytes_unit(max(bad_mem[src].max(), good_mem[src].max())) if src else (1, "B")
    for mem, ls in ((good_mem, GOOD), (bad_mem, BAD)):
        for r in ranks:
            d = mem[mem["rank"] == r]
            ax_act.plot(d["step"], d["act_bytes"] * aunit[0], color=style.rank_color(r), ls=ls)
            if src:
                ax_mem.plot(d["step"], d[src] * munit[0], color=style.rank_color(r), ls=ls)
    ax_act.set_ylabel(f"activations held at step end ({aunit[1]})")
    ax_mem.set_ylabel(f"{'process RSS' if src == 'rss' else src} at step end ({munit[1]})")
    for ax in (ax_act, ax_mem):
        ax.set_xlabel("step")
    ax_act.set_ylim(bottom=0)
    _runs_legend(fig, "correct: sender detaches", "detach missing", ranks)
    return fig, [ax_act, ax_mem]
