"""The paper's figure set on small real runs: one tiny 2-rank sweep (experiments/paper_quick.yaml,
14 mpirun jobs), then every figure function and the whole `analysis.figures` pass on it; and
figures 7-9 on a synthetic sweep (no MPI) whose every number is known by hand."""
import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis import figures as figs, load_run, metrics, style, sweep_stats  # noqa: E402
from analysis.plots import (breakdown_plot, bubble_plot, frame_states,  # noqa: E402
                            pebble_animation, peak_memory_plot, schedules_side_by_side)
from experiments import sweep  # noqa: E402
from helpers import Batches, declare_runs, hand_bubble, render  # noqa: E402

QUICK = Path(sweep.__file__).parent / "paper_quick.yaml"


SPEC = sweep.load_spec(QUICK)
POINTS = [p for p in map(sweep.check, sweep.expand(SPEC)) if not p.skip]
# the sweep's runs, made with the session's other runs (one start-up, not 14); the sweep then
# finds them complete, in its folder, and indexes them as it does a resumed sweep's
# (tests/test_sweep.py runs sweeps with their real launcher)
RUNS = {f"{p.id}-r{k}": (p.ranks, [*p.args(), "quiet=true"])
        for p in POINTS for k in range(p.repeats)}
declare_runs(__name__, RUNS)


@pytest.fixture(scope="module")
def sw(tmp_path_factory):
    import shutil
    out = tmp_path_factory.mktemp("sweep") / "quick"
    assert {p.ranks for p in POINTS} == {2}
    made = Batches(__name__)
    for name in RUNS:
        shutil.copytree(made[name], out / "runs" / name)

    def no_launch(*a):
        raise AssertionError(f"every run was made beforehand: {a}")
    idx = sweep.run_sweep(SPEC, out, launcher=no_launch, log=lambda *a, **k: None)
    assert (idx.loc[idx["status"] != "skipped", "status"] == "complete").all(), idx["message"]
    return figs.load_sweep(out)



def _png(fig):
    return render(fig, 200)


def _run(sw, schedule, overlap=False):
    """The run of `schedule` with the fewest microbatches."""
    r = sw["runs"]
    r = r[(r["schedule"] == schedule) & (r["overlap"] == overlap) & (r["tag"] != "lessons")]
    rec = r.sort_values("m").iloc[0]
    return load_run(sw["path"][(rec["point"], int(rec["repeat"]))])


def test_fig1_three_schedules_share_one_time_scale(sw):
    runs = [_run(sw, s) for s in ("naive", "gpipe", "1f1b")]
    panels = [{"title": s, "events": r.events, "pebbles": r.pebbles, "meta": r.meta,
               "step": r.steps[-1]} for s, r in zip(("naive", "gpipe", "1f1b"), runs)]
    with plt.rc_context(style.RC):
        fig, axes = schedules_side_by_side(panels)
        assert len(axes) == 3 and all(len(a) == 3 for a in axes)   # 2 ranks + bytes, each
        xlims = {a[0].get_xlim() for a in axes}
        assert len(xlims) == 1                                      # the same time axis
        spans = [metrics.step_windows(r.events[r.events["step"] == r.steps[-1]])["span"].iloc[0]
                 for r in runs]
        scale, _ = style.time_unit(max(spans))
        assert xlims.pop()[1] == pytest.approx(max(spans) * scale)
        assert len(fig.legends) == 1 and not any(sf.legends for sf in fig.subfigs)
        _png(fig)


def test_fig2_one_measured_point_per_p_m_and_theory(sw):
    t = sweep_stats.bubble_table(sw["runs"])
    t = t[t["schedule"].isin(figs.CLASSIC)]                         # figure 2's schedules
    assert sorted(zip(t["schedule"], t["m"])) == [("1f1b", 2), ("1f1b", 4), ("gpipe", 2),
                                                  ("naive", 1)]
    with plt.rc_context(style.RC):
        fig, ax = bubble_plot(t, sw["cores"])
        pts = {}
        for c in ax.containers:    # errorbar containers: (data line, caps, bars)
            line = c.lines[0]
            pts[line.get_gid()] = (line.get_xdata(), line.get_ydata())
        assert len(pts) == t.groupby(["p", "schedule"]).ngroups
        for r in t.itertuples():
            x, y = pts[f"measured-p{r.p}-{r.schedule}"]
            assert np.isclose(y, r.bubble).any() and len(x) == (t["schedule"] == r.schedule).sum()
        theory = [l for l in ax.lines if (l.get_gid() or "").startswith("theory")]
        assert len(theory) == 1                                     # one curve: p = 2
        x, y = theory[0].get_xdata(), theory[0].get_ydata()
        assert np.allclose(y, 1 / (x + 1))                          # (p-1)/(m+p-1), p = 2
        _png(fig)


def test_fig3_measured_markers_are_the_pebble_peaks(sw):
    t = sweep_stats.memory_table(sw["ranks"])
    with plt.rc_context(style.RC):
        fig, axes = peak_memory_plot(t, sw["cores"])
        scale, _ = style.bytes_unit(float(np.nanmax(t[["peak_act", "peak_theory"]].to_numpy())))
        for s in ("gpipe", "1f1b"):
            run = _run(sw, s)
            steady = metrics.steady(run.steps)[1]
            tab = metrics.step_table(run.events, run.pebbles)
            peaks = tab[tab["step"].isin(steady)].groupby("rank")["peak_act_bytes"].median()
            for r, b in peaks.items():
                line = next(l for l in axes[0].lines if l.get_gid() == f"measured-p2-{s}-r{r}")
                assert line.get_ydata()[0] == pytest.approx(b * scale)
                th = next(l for l in axes[0].lines if l.get_gid() == f"theory-p2-{s}-r{r}")
                theory = run.meta["pebbles_theory"]["peak_bytes"][r]
                assert th.get_ydata()[0] == pytest.approx(theory * scale)
        _png(fig)


def test_fig4_bars_add_up_to_the_step(sw):
    t = sweep_stats.breakdown_table(sw["ranks"])
    assert set(zip(t["schedule"], t["overlap"])) == {("gpipe", False), ("gpipe", True)}
    tot, other = t[sweep_stats.PARTS].sum(axis=1), t["other_idle"] > 0
    # the parts add up to the median span, unless medians of parts already exceed it (then
    # "other idle" is 0 and the bar stands a little above the span's IQR line)
    assert np.allclose(tot[other], t["span"][other]) and (tot >= t["span"] - 1e-12).all()
    with plt.rc_context(style.RC):
        fig, ax = breakdown_plot(t, sw["cores"])
        bars = [p for p in ax.patches if (p.get_gid() or "").startswith("part-")]
        assert len(bars) == len(t) * len(sweep_stats.PARTS)
        tops = sorted(max(b.get_y() + b.get_height() for b in bars if b.get_x() == x)
                      for x in {b.get_x() for b in bars})
        scale, _ = style.time_unit(float(t["span"].max()))
        assert np.allclose(tops, sorted(t[sweep_stats.PARTS].sum(axis=1) * scale))
        _png(fig)


def _groups_from_trace(run, step, eps):
    """The animation's event groups, recomputed here from the frames (module docstring)."""
    ev = run.events[(run.events["step"] == step)]
    compute = ["fwd", "bwd", "loss", "opt", "norms"]   # docs/run-format.md: the compute lane
    comp = ev[ev["kind"].isin(compute)]
    lo, hi = comp["start"].min(), comp["end"].max()
    ev = ev[ev["kind"].isin(compute + ["send", "recv"])]
    pb = run.pebbles[run.pebbles["step"] == step]
    t = np.sort(np.clip(np.concatenate([ev["start"], ev["end"], pb["stored"],
                                        pb["freed"].dropna()]), lo, hi))
    return 1 + int((np.diff(t) > eps).sum())


@pytest.mark.parametrize("schedule", ["naive", "1f1b"])
def test_fig6_one_frame_per_event_group_empty_at_both_ends(sw, schedule):
    run = _run(sw, schedule)
    step = run.steps[-1]
    eps = 2e-5
    states = frame_states(run.events, run.pebbles, run.meta, step, eps=eps)
    assert len(states) == _groups_from_trace(run, step, eps) + 2
    for s in (states[0], states[-1]):
        assert s["fill"] and all(f == 0 for f in s["fill"].values()) and not s["ops"]
    assert max(max(s["fill"].values()) for s in states) == 1    # every pebble fills at some point
    m = run.meta["schedule"]["microbatches"]
    assert {mb for s in states for (_, row, _), mb in s["ops"].items()
            if row != "opt"} == set(range(m))                   # every microbatch's ops light up
    assert any(s["edges"] for s in states)                      # messages seen in flight
    assert [s["t"] for s in states] == sorted(s["t"] for s in states)
    with plt.rc_context({**style.RC, "figure.constrained_layout.use": False}):
        fig, ax, update = pebble_animation(states, run.events, run.meta, step)
        update(len(states) // 2)
        _png(fig)


def test_make_writes_the_whole_set(sw, tmp_path):
    out = tmp_path / "figs"
    n = figs.make(sw, out, formats=("png",), log=lambda s: None)   # loaded once, by `sw`
    assert not n["skipped"]
    for name in ("fig1_schedules", "fig2_bubble", "fig3_memory", "fig4_breakdown",
                 "fig7_zb_schedules", "fig8_zb_bubble", "fig9_zb_memory",
                 "lesson_requires_grad", "lesson_detach"):
        img = plt.imread(out / f"{name}.png")
        assert img.shape[1] > 300 and img[..., :3].std() > 0.05, name
    from PIL import Image
    gif = Image.open(out / "fig6_animation.gif")
    pngs = list((out / "fig6_frames").glob("*.png"))
    assert gif.n_frames == n["animation"]["frames"] == len(pngs)
    assert (out / "fig6_animation.gif").stat().st_size < 2e6
    assert json.loads((out / "numbers.json").read_text())["setup"]["repeats"] == 1
    rg = n["lessons"]["requires_grad"]
    assert rg["weights_changed_per_stage"] == [False, True]        # lesson 1, measured
    from experiments.paper import index_markdown
    md = index_markdown(n)
    for f in ("fig1_schedules.png", "fig2_bubble.png", "fig6_animation.gif", "lesson_detach.png"):
        assert f"]({f})" in md
    assert "device cpu" in md and "1 repeat per point" in md


# -- figures 7-9 on a synthetic sweep (no MPI): every number known by hand ---------------------
# Synthetic runs (harness.synthetic) play each schedule through the simulator with equal
# forward, input-gradient and weight-gradient times per layer, free messages, a free loss and
# opt: the measured bubble must then equal each schedule's closed form, and the simulator's
# prediction (calibrated on the run itself) the measurement.
ZB = {"1f1b": 1, "interleaved": 2, "zb_h1": 1, "zbv": 2}   # schedule -> chunks per rank


class SyntheticLauncher:
    """A sweep launcher that writes a synthetic run (harness.synthetic) for each point: two
    layers per rank, split into v chunks of 2/v layers; every layer's F, B and W 1 ms."""

    def __call__(self, ranks, args, run_dir, timeout):
        from harness.synthetic import MS, make_run
        kv = dict(a.split("=", 1) for a in args)
        v = int(kv.get("pipeline.virtual", 1))
        make_run(run_dir, p=ranks, m=int(kv["pipeline.microbatches"]), schedule=kv["schedule"],
                 virtual=v, layers_per_stage=2 // v, steps=4, t_fwd=MS, t_bwd=2 * MS,
                 t_loss=0, t_opt=0, xfer=0, batch=48)
        (run_dir / "config.yaml").write_text(
            "model: {layers: 4, width: 64, in_features: 64, classes: 10}\n"
            "data: {batch_size: 48}\ntrain: {steps: 4}\n")
        return run_dir


@pytest.fixture(scope="module")
def zb_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("zbsweep") / "syn"
    points = [{"ranks": p, "schedule": s, "pipeline.microbatches": m,
               **({"pipeline.virtual": v} if v > 1 else {})}
              for p in (2, 3) for s, v in ZB.items() for m in (p, 2 * p)]
    spec = {"sweep": {"name": "zb_synthetic", "base": "deep_mlp", "repeats": 1, "ranks": [2],
                      "grid": {"schedule": ["1f1b"], "pipeline.microbatches": [2]},
                      "fixed": {"model.layers": 12, "data.batch_size": 48},
                      "points": points[1:]}}                 # the grid is the first point
    idx = sweep.run_sweep(spec, out, launcher=SyntheticLauncher(), ncores=4,
                          log=lambda *a, **k: None)
    assert (idx["status"] == "complete").all(), idx[["point", "status", "message"]]
    return out


@pytest.fixture(scope="module")
def zb_loaded(zb_sweep):
    return figs.load_sweep(zb_sweep)


def test_zb_figures_drawn_and_their_numbers_right(zb_loaded, tmp_path, monkeypatch):
    # figures 7-9 drawn once on their canvas (helpers.render) where make would save them, the
    # others (1-3: test_make_writes_the_whole_set) closed: the files make writes are checked
    # on the real sweep there
    drawn = {}

    def draw(fig, out, name, formats):
        if name[:4] in ("fig7", "fig8", "fig9"):
            render(fig, 300)                 # draws, checks it is a picture, closes it
        else:
            plt.close(fig)
        drawn[name] = formats
        return [f"{name}.{fmt}" for fmt in formats]
    monkeypatch.setattr(figs.style, "save", draw)
    out = tmp_path / "figs"
    n = figs.make(zb_loaded, out, formats=("png",), gif=False, log=lambda s: None)
    assert {"fig7_zb_schedules", "fig8_zb_bubble", "fig9_zb_memory"} <= drawn.keys() == \
        n["made"].keys()
    # figure 7: the four schedules at one p and m, in order, each with its v
    f7 = n["fig7"]
    assert [q["schedule"] for q in f7] == list(ZB)
    assert {(q["p"], q["m"]) for q in f7} == {(2, 4)} and [q["v"] for q in f7] == list(ZB.values())
    # figure 8's numbers: measured = the hand formula = the simulator's prediction
    b = json.loads((out / "numbers.json").read_text())["headline"]["bubble"]
    assert len(b) == 16 and {(r["schedule"], r["v"]) for r in b} == set(ZB.items())
    for r in b:
        th = hand_bubble(r["schedule"], r["p"], r["m"], r["v"])
        assert r["theory"] == pytest.approx(th, abs=1e-12), r
        assert r["measured"] == pytest.approx(th, abs=1e-9), r
        assert r["simulated"] == pytest.approx(r["measured"], abs=1e-9), r
        if r["schedule"] in ("zb_h1", "zbv"):       # equal measured F/B/W: the same theory
            assert r["theory_times"] == pytest.approx(th, abs=1e-9), r
        else:
            assert r["theory_times"] is None
    # figure 9's numbers: every stage's measured peak is the walked theory to the byte, but
    # for one artefact of the free loss (t_loss=0): on the last stage of a full-backward
    # schedule the loss's pebble (4096 bytes, synthetic's act_bytes) is stored and freed at
    # one instant, which live_bytes (frees first at a tie) never counts as held
    mem = n["memory"]
    assert len(mem) == sum(p for p in (2, 3) for _ in ZB for _ in (0, 1))
    for r in mem:
        last = r["rank"] == r["p"] - 1 and r["schedule"] in ("1f1b", "interleaved")
        assert r["measured"] == r["theory"] - 4096 * last, r
    md = __import__("experiments.paper", fromlist=["index_markdown"]).index_markdown(n)
    for f in ("fig7_zb_schedules.png", "fig8_zb_bubble.png", "fig9_zb_memory.png"):
        assert f"]({f})" in md


def test_bubble_plot_by_schedule_draws_each_theory_with_its_v(zb_loaded):
    sw_ = zb_loaded
    t = sweep_stats.bubble_table(sw_["runs"])
    with plt.rc_context(style.RC):
        fig, axes = bubble_plot(t, sw_["cores"], by="schedule")
        assert len(axes) == 2                                          # p = 2, 3
        for ax, p in zip(axes, (2, 3)):
            lines = {l.get_gid(): l for l in ax.lines}
            for s, v in ZB.items():
                th = lines[f"theory-p{p}-{s}"]
                x, y = th.get_xdata(), th.get_ydata()
                assert np.allclose(y, [hand_bubble(s, p, xx, v) for xx in x])
                sim = lines[f"simulated-p{p}-{s}"].get_ydata()
                d = t[(t["p"] == p) & (t["schedule"] == s)].sort_values("m")
                assert np.allclose(sim, d["bubble_sim"]) and len(sim) == 2
        _png(fig)


def test_tables_keep_configurations_apart_and_make_refuses_a_mix(zb_sweep, tmp_path, capsys):
    # one run's meta says bf16: its numbers must not be folded into the fp32 medians, and the
    # figure set (which compares schedules of one configuration) refuses the mixed sweep
    import shutil
    d = tmp_path / "mixed"
    shutil.copytree(zb_sweep, d)
    # two of its runs are enough for a mix (loading a sweep analyses each of its runs)
    index = pd.read_csv(d / "sweep.csv")
    index[index["status"] == "complete"].head(2).to_csv(d / "sweep.csv", index=False)
    sw = figs.load_sweep(d)
    assert len(sw["runs"]) == 2
    assert sweep_stats.configs(sw["runs"]) and len(sweep_stats.configs(sw["runs"])) == 1
    rec = sw["runs"].iloc[0]
    meta_path = sw["path"][(rec["point"], int(rec["repeat"]))] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("model", {})["dtype"] = "bf16"
    meta_path.write_text(json.dumps(meta))
    sw = figs.load_sweep(d)
    assert sorted(c["precision"] for c in sweep_stats.configs(sw["runs"])) == ["bf16", "fp32"]
    # the same point run twice, once per precision, with different numbers: two rows
    fp32 = sw["runs"].iloc[[1]]
    twin = fp32.assign(precision="bf16", bubble=fp32["bubble"] * 2, repeat=1)
    bub = sweep_stats.bubble_table(pd.concat([fp32, twin], ignore_index=True))
    assert sorted(bub["precision"]) == ["bf16", "fp32"] and (bub["n"] == 1).all()
    assert bub.set_index("precision")["bubble"].to_dict() == pytest.approx(
        {"fp32": fp32["bubble"].iloc[0], "bf16": 2 * fp32["bubble"].iloc[0]})
    key = (sw["ranks"]["point"] == fp32["point"].iloc[0])
    r32 = sw["ranks"][key]
    mem = sweep_stats.memory_table(pd.concat([r32, r32.assign(precision="bf16", repeat=1,
                                                              peak_act=0)]))
    assert len(mem) == 2 * len(r32) and (mem["n"] == 1).all()
    assert (mem.loc[mem["precision"] == "bf16", "peak_act"] == 0).all()
    assert (mem.loc[mem["precision"] == "fp32", "peak_act"] > 0).all()
    assert figs.main([str(d), "--out", str(tmp_path / "f2"), "--no-gif"]) == 2
    assert re.search("error: .*2 configurations.*precision=bf16", capsys.readouterr().err)
    assert not (tmp_path / "f2").exists() or not any((tmp_path / "f2").iterdir())


class KeyedLauncher(SyntheticLauncher):
    """SyntheticLauncher whose activations are 4096 bytes times the `factor` of the value of
    one swept key, a key the synthetic meta.json does not record (as a harness older than
    meta.json's schedule.recompute)."""

    def __init__(self, key, factor):
        self.key, self.factor = key, factor

    def __call__(self, ranks, args, run_dir, timeout):
        from harness.synthetic import MS, make_run
        kv = dict(a.split("=", 1) for a in args)
        make_run(run_dir, p=ranks, m=int(kv["pipeline.microbatches"]), schedule=kv["schedule"],
                 steps=4, t_fwd=MS, t_bwd=2 * MS, t_loss=0, t_opt=0, xfer=0, batch=48,
                 act_bytes=4096 * self.factor[kv[self.key]])
        return run_dir


@pytest.mark.parametrize("key, column, base, factor", [
    ("pipeline.recompute", "recompute", "gpt", {"none": 4, "full": 1}),
    ("model.width", "model.width", "deep_mlp", {"64": 1, "128": 2}),
])
def test_a_swept_key_is_a_group_of_its_own_in_every_table(tmp_path, key, column, base, factor):
    """A sweep that varies a key beyond (p, schedule, v, m): the tables keep its values apart
    (pooled, figure 3 drew the median of the two as one point), and the figure set, which
    draws one point per (p, schedule, v, m), refuses the sweep naming the key. `column`: the
    tables' name for the key."""
    spec = {"sweep": {"name": "keyed", "base": base, "repeats": 1, "ranks": [2],
                      "grid": {"schedule": ["gpipe"], "pipeline.microbatches": [2],
                               key: list(factor)},
                      "fixed": {"data.batch_size": 48}}}
    out = tmp_path / "sw"
    idx = sweep.run_sweep(spec, out, launcher=KeyedLauncher(key, factor), ncores=4,
                          log=lambda *a, **k: None)
    assert (idx["status"] == "complete").all(), idx[["point", "status", "message"]]
    sw_ = figs.load_sweep(out)
    mem = sweep_stats.memory_table(sw_["ranks"])
    assert len(mem) == 2 * 2 and (mem["n"] == 1).all()               # 2 values x 2 ranks
    # each value's own peaks, which the factor scales: rank for rank the same per unit
    (a, fa), (b, fb) = [(mem[mem[column].astype(str) == v].sort_values("rank"), f)
                        for v, f in factor.items()]
    assert len(a) == len(b) == 2 and (a["peak_act"] > 0).all()
    assert np.array_equal(a["peak_act"].to_numpy() / fa, b["peak_act"].to_numpy() / fb)
    bub = sweep_stats.bubble_table(sw_["runs"])
    assert len(bub) == 2 and (bub["n"] == 1).all()
    with pytest.raises(figs.MixedSweep, match=f"2 configurations.*{column}="):
        figs.make(sw_, tmp_path / "figs", formats=("png",), gif=False, log=lambda s: None)
