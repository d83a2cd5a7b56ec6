"""Figure sizes and the saved resolution, for a two-column paper (analysis.style's rcParams use
them), in a module without matplotlib: the analysis's pass cuts the memory figure's curves to
its pixel columns before anything draws."""
from __future__ import annotations

import math

COLUMN, WIDE = 3.4, 7.0          # inches: one column, both columns
MEMORY_SIZE = (COLUMN, 2.8)      # inches: plots.memory's figure
FIGURE_DPI, SAVE_DPI = 150, 300  # rcParams figure.dpi, savefig.dpi


def columns_for(width_in: float, px: float = 2.0, dpi: float = SAVE_DPI) -> int:
    """How many columns of `px` saved pixels a figure `width_in` inches wide has (what
    plots.common.columns gives for such a figure under analysis.style.RC)."""
    return max(1, int(math.ceil(width_in * dpi / px)))


# what matplotlib's Agg canvas writes (tests/test_analysis_load.py checks them against it)
FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "pgf", "jpg", "jpeg", "tif", "tiff", "webp")


def figure_formats(text: str) -> list[str]:
    """The figure formats of a `--format` option: comma-separated, `none` (or nothing) for no
    figure; ValueError naming one that matplotlib cannot write."""
    got = [f.strip().lower() for f in text.split(",") if f.strip().lower() not in ("", "none")]
    for f in got:
        if f not in FORMATS:
            raise ValueError(f"--format {text}: cannot write {f!r} (one of {', '.join(FORMATS)}, "
                             f"or none)")
    return list(dict.fromkeys(got))
