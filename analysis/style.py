"""One style for every figure: a dict of rcParams (tueplots' approach), sizes and colours.

Use `with matplotlib.rc_context(style.RC): ...` around drawing *and* saving. Sizes are for a
two-column paper: COLUMN = 3.4 in (one column), WIDE = 7.0 in (both columns). No LaTeX needed.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from cycler import cycler
from matplotlib import colormaps
from matplotlib.colors import to_rgba, to_rgba_array

from analysis.dims import COLUMN, FIGURE_DPI, MEMORY_SIZE, SAVE_DPI, WIDE  # noqa: F401

# Okabe & Ito (2008) colour-blind-safe palette, black moved last (used for annotation)
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#000000"]
KIND = {"fwd": "#0072B2", "bwd": "#D55E00", "loss": "#CC79A7", "opt": "#7F7F7F", "norms": "#BBBBBB",
        "send": "#009E73", "recv": "#56B4E9", "wait": "#FFFFFF", "copy": "#F0E442"}
IDLE = "#DDDDDD"
OTHER = "#9E9E9E"  # compute of a neighbouring step seen in the window
FLOW = "#333333"

RC = {
    "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6,
    "ytick.labelsize": 6, "legend.fontsize": 6, "legend.title_fontsize": 6,
    "font.family": "sans-serif", "text.usetex": False, "mathtext.default": "regular",
    "axes.prop_cycle": cycler(color=PALETTE), "axes.linewidth": 0.5,
    "axes.spines.top": False, "axes.spines.right": False,
    "xtick.major.width": 0.5, "ytick.major.width": 0.5, "xtick.major.size": 2,
    "ytick.major.size": 2, "lines.linewidth": 1.0, "hatch.linewidth": 0.4,
    "legend.frameon": False, "legend.handlelength": 1.2, "legend.columnspacing": 1.0,
    "figure.dpi": FIGURE_DPI, "savefig.dpi": SAVE_DPI, "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
    "figure.constrained_layout.use": True,
    "pdf.fonttype": 42, "ps.fonttype": 42,  # embed TrueType: editable text in the PDF
}


_VIRIDIS = colormaps["viridis"]  # the registry hands out a copy per lookup (~0.3 ms each)


def mb_color(mb: int, m: int = 7, alpha: float = 1.0):
    """Colour of microbatch `mb` of `m`: the palette (black excluded) for up to 7 microbatches,
    else viridis (perceptually uniform, colour-blind safe), so no two microbatches share one."""
    if m <= 7:
        return to_rgba(PALETTE[int(mb) % 7], alpha)
    return to_rgba(_VIRIDIS(0.92 * int(mb) / (m - 1)), alpha)


def mb_colors(mbs, m: int = 7, alpha: float = 1.0) -> np.ndarray:
    """mb_color of each microbatch in `mbs` as an (N, 4) RGBA array, each colour made once."""
    uniq, inv = np.unique(np.asarray(mbs, int), return_inverse=True)
    return to_rgba_array([mb_color(k, m, alpha) for k in uniq]).reshape(-1, 4)[inv]


def rank_color(rank: int):
    return PALETTE[int(rank) % 7]


def time_unit(span_s: float) -> tuple[float, str]:
    """(scale, unit) so that span_s*scale reads well: s, ms or µs."""
    if span_s >= 2:
        return 1.0, "s"
    if span_s >= 2e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def bytes_unit(peak: float) -> tuple[float, str]:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if peak >= scale:
            return 1 / scale, unit
    return 1.0, "B"


def save(fig, out, name: str, formats) -> list[str]:
    """Save `fig` as out/name.<fmt> for each format and close it; returns the file names.
    Call inside `rc_context(RC)`, so the savefig settings apply."""
    files = [f"{name}.{fmt}" for fmt in formats]
    for f in files:
        fig.savefig(Path(out) / f)
    plt.close(fig)
    return files
