"""Figures on synthetic runs: non-empty images whose drawn content matches the data."""
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis import load_run, style  # noqa: E402
from analysis.metrics import recv_split  # noqa: E402
from analysis.plots import memory_plot, pebble_graph, planned_frame, timeline  # noqa: E402
from helpers import render  # noqa: E402
from harness.synthetic import make_run


@pytest.fixture(scope="module", params=[("naive", 1, False), ("gpipe", 3, True),
                                        ("1f1b", 4, False)], ids=["naive", "gpipe-nb", "1f1b"])
def run(request, tmp_path_factory):
    name, m, overlap = request.param
    p = 2 if name == "naive" else 3
    return load_run(make_run(tmp_path_factory.mktemp(name) / "r", p=p, m=m, schedule=name,
                             steps=3, overlap=overlap))



def _png(fig):
    return render(fig, 300)


def _collections(fig, gid):
    return [c for ax in fig.axes for c in ax.collections if c.get_gid() == gid]


def test_pebble_graph_draws_every_pebble_and_pair(run):
    step = run.steps[-1]
    with plt.rc_context(style.RC):
        fig, axes = pebble_graph(run.events, run.pebbles, run.meta, step)
        bars = sum(len(c.get_paths()) for c in _collections(fig, "pebbles"))
        assert bars == (run.pebbles["step"] == step).sum()
        comp = run.events[(run.events["step"] == step) & (run.events["lane"] == "compute")]
        assert sum(len(c.get_paths()) for c in _collections(fig, "compute")) == len(comp)
        arrows = [a for a in fig.artists if a.get_gid() == "flow"]
        rs = recv_split(run.events[run.events["step"] == step])
        assert len(arrows) == rs["matched"].sum() == 2 * (run.world_size - 1) * \
            run.meta["schedule"]["microbatches"]
        assert len(axes) == run.world_size + 1
        assert _collections(fig, "idle")                 # naive pipelines always idle
        _png(fig)


def test_timeline_arrows_boxes_and_plan(run):
    steps = run.steps[-2:]
    plan = planned_frame(run.schedule, run.events)
    assert plan is not None and set(plan["rank"]) == set(range(run.world_size))
    with plt.rc_context(style.RC):
        fig, axes = timeline(run.events, steps, plan)
        ev = run.events[run.events["step"].isin(steps)]
        q = [c for c in axes[0].collections if c.get_gid() == "flows"][0]
        assert len(q.U) == recv_split(ev)["matched"].sum()
        waits = [c for c in axes[0].collections if c.get_gid() == "recv-wait"][0]
        assert len(waits.get_paths()) == (ev["kind"] == "recv").sum()
        planned_fwd = [c for c in axes[1].collections if c.get_gid() == "planned-fwd"][0]
        assert len(planned_fwd.get_paths()) == (plan["kind"] == "fwd").sum() * len(steps)
        _png(fig)


def test_timeline_without_plan_and_memory(run):
    with plt.rc_context(style.RC):
        fig, axes = timeline(run.events)
        assert len(axes) == 1
        _png(fig)
        fig, (aax, dax) = memory_plot(run.pebbles, run.memory)
        assert len(aax.lines) == run.world_size and len(dax.lines) == run.world_size
        assert aax.get_ylabel().startswith("activations (") and "(" in dax.get_ylabel()
        _png(fig)


def test_single_step_and_stage_level_spans(tmp_path):
    """per-layer tracing off (layer = -1 everywhere): one F and one B row per rank, one step."""
    run = load_run(make_run(tmp_path / "r", p=2, steps=1))
    run.events["layer"] = -1
    run.pebbles["layer"] = -1
    with plt.rc_context(style.RC):
        fig, axes = pebble_graph(run.events, run.pebbles, run.meta, 0)
        assert [len(ax.get_yticks()) for ax in axes[:-1]] == [3, 3]   # F stage, B stage, opt
        _png(fig)
        fig, _ = timeline(run.events, planned=planned_frame(run.schedule, run.events))
        _png(fig)


# ---- the fast paths against straightforward references ----------------------------------

def test_mb_colors_are_mb_color_of_each():
    from matplotlib.colors import to_rgba
    rng = np.random.default_rng(0)
    for m in (1, 3, 7, 8, 12):
        mbs = np.r_[-1, rng.integers(0, m, 50)]
        for alpha in (1.0, 0.45):
            got = style.mb_colors(mbs, m, alpha)
            assert got.shape == (len(mbs), 4)
            np.testing.assert_array_equal(got, [to_rgba(style.mb_color(k, m, alpha)) for k in mbs])


def test_median_durations_match_a_groupby(run):
    from analysis.measure.plan import _median_durations
    from analysis.metrics import COMPUTE
    for ev in (run.events, run.events[run.events["step"].isin(run.steps[1:])],
               run.events[run.events["kind"] != "opt"]):
        # the formulation it replaced: sum per (rank, step, action, mb), median per (rank, action)
        comp = ev[ev["kind"].isin(COMPUTE)]
        kind = comp["kind"].astype(object).replace({"loss": "fwd", "norms": "opt"})
        ref = (comp.assign(k=kind, d=comp["end"] - comp["start"])
               .groupby(["rank", "step", "k", "mb"])["d"].sum().groupby(["rank", "k"]).median())
        ref = ref[ref.index.get_level_values("k").isin(("fwd", "bwd", "opt"))]
        got = _median_durations(ev)
        assert sorted(got.index) == sorted(ref.index)
        for key, v in ref.items():
            assert got[key] == pytest.approx(v, rel=1e-12)


def test_pebble_bytes_panel_is_the_whole_runs_level(run):
    """The bytes panel uses only the pebbles held in the window; its curves must be those of
    live_bytes over all pebbles."""
    from analysis.metrics import live_bytes, step_windows
    from analysis.plots.common import step_curve
    peb = run.pebbles.copy()
    # pebbles held across windows: every other one of the first step never freed, every third
    # one of the second freed only in the last step
    first, second = (np.flatnonzero(peb["step"] == s) for s in run.steps[:2])
    peb.loc[first[::2], "freed"] = np.nan
    peb.loc[second[::3], "freed"] = run.events["end"].max()
    lb = live_bytes(peb)
    for step in run.steps:
        with plt.rc_context(style.RC):
            fig, axes = pebble_graph(run.events, peb, run.meta, step)
        ev = run.events[(run.events["step"] == step) & (run.events["lane"] != "step")]
        win = step_windows(ev).iloc[0]
        lo, hi = win["start"], win["end"]
        curves = [step_curve(lb, r, lo, hi) for r in sorted(ev["rank"].unique())]
        bscale = style.bytes_unit(max(b.max() for _, b in curves) or 1)[0]
        lines = axes[-1].lines
        assert len(lines) == len(curves)
        for ln, (t, b) in zip(lines, curves):
            np.testing.assert_allclose(ln.get_ydata(), b * bscale, rtol=1e-12)
            x = np.asarray(ln.get_xdata())
            np.testing.assert_allclose(x / x[-1] if x[-1] else x, (t - lo) / (t[-1] - lo),
                                       rtol=1e-9, atol=1e-12)
        plt.close(fig)


def _band_reference(t, y, lo, hi, n, step):
    """common.band written out column by column."""
    w = (hi - lo) / n
    col = np.clip(np.floor((t - lo) / w).astype(int), 0, n - 1)

    def at(x):   # the curve's value at time x (inside [t[0], t[-1]])
        if step:
            return y[np.flatnonzero(t <= x)[-1]]
        return np.interp(x, t, y)
    xs, top, bot = [], [], []
    for c in range(col[0], col[-1] + 1):
        a = t[0] if c == col[0] else lo + c * w
        b = t[-1] if c == col[-1] else lo + (c + 1) * w
        vals = [at(a), at(b)] + list(y[col == c])
        xs += [a, b]
        top += [max(vals)] * 2
        bot += [min(vals)] * 2
    return np.r_[xs, xs[::-1]], np.r_[top, bot[::-1]]


@pytest.mark.parametrize("step", [False, True])
def test_band_is_the_per_column_range(step):
    from analysis.plots.common import band
    rng = np.random.default_rng(1)
    t = np.sort(np.r_[rng.uniform(0, 40, 3000), rng.uniform(70, 100, 2000), [50.0] * 3])
    y = rng.normal(0, 1, len(t)).cumsum()
    for lo, hi, n in ((0.0, 100.0, 37), (-5.0, 120.0, 200), (t[0], t[-1], 1000)):
        x, yy = band(t, y, lo, hi, n, step)
        rx, ry = _band_reference(t, y, lo, hi, n, step)
        np.testing.assert_allclose(x, rx, rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(yy, ry)
        # every sample lies inside the polygon's column
        m = len(x) // 2
        left, top, bot = x[:m:2], yy[:m:2], yy[m:][::-1][::2]
        i = np.clip(np.searchsorted(left, t, "right") - 1, 0, len(left) - 1)
        assert (bot[i] <= y).all() and (y <= top[i]).all()


def test_envelope_keeps_each_columns_first_extremes_and_last():
    from analysis.plots.common import envelope
    rng = np.random.default_rng(2)
    t = np.sort(rng.uniform(0, 10, 20000))
    y = rng.integers(0, 50, len(t)).astype(float)
    n = 300
    tt, yy = envelope(t, y, 0.0, 10.0, n)
    assert len(tt) <= 4 * n and (np.diff(tt) >= 0).all()
    col, ecol = (np.clip((a / 10 * n).astype(int), 0, n - 1) for a in (t, tt))
    for c in np.unique(col):
        raw, got = y[col == c], yy[ecol == c]
        assert got.min() == raw.min() and got.max() == raw.max()
        assert got[0] == raw[0] and got[-1] == raw[-1]
    assert np.isin(tt, t).all()   # samples of the curve, none made up


def test_memory_plot_draws_a_dense_run_as_bands(run):
    """More samples than the image has columns: solid curves become one band polygon each,
    which holds every sample, under a line along its top (the peaks); dashed ones stay lines
    (their dashes must show)."""
    import pandas as pd
    from matplotlib.collections import PolyCollection
    t = np.linspace(0, 50, 20000)
    mem = pd.concat([pd.DataFrame({"rank": r, "time": t, "source": src,
                                   "bytes": (100 << 20) + ((t * 1e6).astype(int) % (5 << 20))})
                     for r in range(2) for src in ("cuda_allocated", "rss")], ignore_index=True)
    with plt.rc_context(style.RC):
        fig, (aax, dax) = memory_plot(run.pebbles, mem)
        bands = [c for c in dax.collections if isinstance(c, PolyCollection)]
        dashed = [ln for ln in dax.lines if ln.get_linestyle() != "-"]
        tops = [ln for ln in dax.lines if ln.get_linestyle() == "-"]
        assert len(bands) == 2 and len(dashed) == 2 and len(tops) == 2  # rss: band + its top
        scale = 1 / 2**20
        for pc, top in zip(bands, tops):
            v = pc.get_paths()[0].vertices
            assert v[:, 1].min() == pytest.approx(100) and v[:, 1].max() <= 105
            assert v[:, 1].max() == pytest.approx(mem["bytes"].max() * scale)
            half = len(top.get_ydata())             # the band's upper edge is the line
            assert len(v) in (2 * half, 2 * half + 1)  # (+1: the path closed)
            assert np.allclose(top.get_ydata(), v[:half, 1])
            assert np.all(top.get_ydata() >= v[half:2 * half, 1][::-1])
        assert all(len(ln.get_xdata()) <= 4 * 2 * 1020 for ln in dax.lines)
        _png(fig)
