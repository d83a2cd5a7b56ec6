"""Transformer activation memory: one GPT block measured, beside the hand derivation and the
published formula (Korthikanti et al. 2022), over sequence length and width.

Measured = the bytes a PebbleTracker (harness/trace/pebbles.py, the harness's own instrument)
sees one transformer block save for backward, for a microbatch of b rows; derived =
harness/models/gpt_memory.saved_bytes_per_block; published = s·b·h·(34 + 5·a·s/h) (16-bit
activations, dropout masks) and its fp32/no-dropout adjustment s·b·h·(64 + 4·a·s/h).
Pure computation (no files): `measure` returns a table, `plot` draws it.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.ticker import NullFormatter, ScalarFormatter

from analysis import metrics, style
from harness.models import gpt as G
from harness.models import gpt_memory as GM
from harness.trace.pebbles import PebbleTracker


def measured_block_bytes(cfg: dict, b: int) -> int:
    """Bytes one transformer block saves for backward (live pebbles after its forward)."""
    blk = G.build_blocks(G.gpt_cfg(cfg), seed=0)[1]
    trk = PebbleTracker(lambda: 0, blk.parameters())
    x = torch.randn(b, cfg["seq"], cfg["d"], requires_grad=True)
    with trk.hooks():
        y = blk(x)
    n = trk.live_bytes
    del y
    return n


def measure(b: int = 4, heads: int = 4, seqs=(32, 64, 128, 256), widths=(64, 128, 256, 512),
            seq0: int = 128, d0: int = 256) -> pd.DataFrame:
    """One row per (axis, s, d, recompute): measured, derived and published bytes."""
    rows = []
    for axis, pts in (("seq", [(s, d0) for s in seqs]), ("d", [(seq0, d) for d in widths])):
        for s, d in pts:
            for rc in ("none", "attention"):
                cfg = {"seq": s, "d": d, "heads": heads, "layers": 1, "recompute": rc,
                       "vocab": 64}
                rows.append({"axis": axis, "s": s, "d": d, "recompute": rc,
                             "measured": measured_block_bytes(cfg, b),
                             "derived": GM.saved_bytes_per_block(cfg, b)["total"],
                             "korthikanti_16bit": GM.korthikanti_bytes(s, b, d, heads),
                             "korthikanti_fp32": GM.korthikanti_fp32_no_dropout(
                                 s, b, d, heads, selective=rc == "attention")})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, b: int, heads: int, fig=None):
    """Two panels (bytes against s, against d): measured markers on the formulas' lines."""
    if fig is None:
        fig = plt.figure(figsize=(style.WIDE, 2.5))
    axes = fig.subplots(1, 2)
    for ax, axis, xl in zip(axes, ("seq", "d"), ("sequence length s (tokens)", "width h (gpt.d)")):
        t = table[table["axis"] == axis]
        x = "s" if axis == "seq" else "d"
        for rc, mk, ls in (("none", "o", "-"), ("attention", "s", "--")):
            u = t[t["recompute"] == rc].sort_values(x)
            tag = "no recompute" if rc == "none" else "selective recompute"
            ax.plot(u[x], u["measured"] / 2**20, ls="", marker=mk, ms=4, mfc="none", color="black",
                    label=f"measured, {tag}", gid=f"measured-{axis}-{rc}")
            ax.plot(u[x], u["derived"] / 2**20, ls=ls, lw=0.8, color=style.PALETTE[0],
                    label=f"derived from the code, {tag}")
            ax.plot(u[x], u["korthikanti_fp32"] / 2**20, ls=ls, lw=0.8, color=style.PALETTE[1],
                    label=f"Korthikanti fp32, no dropout, {tag}")
        u = t[t["recompute"] == "none"].sort_values(x)
        ax.plot(u[x], u["korthikanti_16bit"] / 2**20, ls=":", lw=0.8, color=style.PALETTE[2],
                label="Korthikanti 16-bit + dropout (published)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(u[x]), [str(int(v)) for v in sorted(u[x])])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xl)
        ax.set_ylabel("saved bytes per block (MiB)")
    axes[0].set_title(f"h={int(table[table['axis'] == 'seq']['d'].iloc[0])}, b={b}, a={heads}",
                      loc="left")
    axes[1].set_title(f"s={int(table[table['axis'] == 'd']['s'].iloc[0])}, b={b}, a={heads}",
                      loc="left")
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="outside upper center", ncol=3, fontsize=5.5)
    return fig, axes


def tradeoff_table(runs: dict) -> pd.DataFrame:
    """{recompute mode: loaded Run} -> per mode: peak activation bytes (max over ranks, median
    over steady steps) and the median step span (s), from metrics.summarize."""
    rows = []
    for mode, run in runs.items():
        s = metrics.summarize(run.events, run.pebbles, run.memory, run.meta, run.steps)
        peak = max(r["peak_act_bytes"] for r in s["per_rank"])
        rows.append({"recompute": mode, "peak_act_bytes": peak,
                     "step_s": s["pipeline"]["step_span_s"]})
    return pd.DataFrame(rows)


def plot_tradeoff(table: pd.DataFrame, fig=None):
    """Peak activation memory against step time, one point per recompute mode."""
    if fig is None:
        fig = plt.figure(figsize=(style.COLUMN, 2.3))
    ax = fig.subplots()
    for i, r in enumerate(table.itertuples()):
        ax.plot(r.step_s * 1e3, r.peak_act_bytes / 2**20, "o", color=style.PALETTE[i], ms=5,
                label=f"recompute={r.recompute}", gid=f"tradeoff-{r.recompute}")
    ax.set_xlabel("step time (ms, median)")
    ax.set_ylabel("peak activations (MiB, max over ranks)")
    ax.set_ylim(0, None)
    ax.legend(loc="upper right")
    return fig, ax
