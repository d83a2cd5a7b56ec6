"""Figures on synthetic runs: non-empty images whose drawn content matches the data."""
import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis import load_run, style  # noqa: E402
from analysis.metrics import recv_split  # noqa: E402
from analysis.plots import memory_plot, pebble_graph, planned_frame, timeline  # noqa: E402
from helpers import render_png  # noqa: E402
from harness.synthetic import make_run


@pytest.fixture(scope="module", params=[("naive", 1, False), ("gpipe", 3, True),
                                        ("1f1b", 4, False)], ids=["naive", "gpipe-nb", "1f1b"])
def run(request, tmp_path_factory):
    name, m, overlap = request.param
    p = 2 if name == "naive" else 3
    return load_run(make_run(tmp_path_factory.mktemp(name) / "r", p=p, m=m, schedule=name,
                             steps=3, overlap=overlap))



def _png(fig):
    return render_png(fig, 300)


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
