"""The GPT memory figure: the measured points are the harness tracker's bytes, equal to the
hand derivation; the published formula is drawn beside them, and the trade-off figure shows one
point per recompute mode."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import gpt_memory as gm  # noqa: E402
from analysis import style  # noqa: E402
from helpers import render  # noqa: E402


def test_measured_equals_derived_and_is_drawn():
    t = gm.measure(b=2, heads=2, seqs=(8, 16), widths=(16, 32), seq0=16, d0=32)
    assert (t["measured"] == t["derived"]).all()
    # the published count assumes 16-bit activations and dropout: it is not ours
    assert (t["korthikanti_16bit"] != t["measured"]).all()
    with plt.rc_context(style.RC):
        fig, axes = gm.plot(t, 2, 2)
        line = next(ln for ln in axes[0].lines if ln.get_gid() == "measured-seq-none")
        want = t[(t["axis"] == "seq") & (t["recompute"] == "none")].sort_values("s")
        assert np.allclose(line.get_ydata(), want["measured"] / 2**20)
        render(fig)


def test_tradeoff_one_point_per_mode():
    t = pd.DataFrame({"recompute": ["none", "attention", "full"],
                      "peak_act_bytes": [3 << 20, 2 << 20, 1 << 20], "step_s": [0.1, 0.11, 0.13]})
    with plt.rc_context(style.RC):
        fig, ax = gm.plot_tradeoff(t)
        gids = sorted(ln.get_gid() for ln in ax.lines)
        assert gids == ["tradeoff-attention", "tradeoff-full", "tradeoff-none"]
        render(fig)
