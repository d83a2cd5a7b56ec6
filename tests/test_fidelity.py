"""What the trace must not hide (the audit of issue 10): all of a backward call is compute, the
optimizer's span is the optimizer's, no-detach's kept input gradients are counted, stage 0's
input is released when its pebble says so, and pebbles are timed with the rank's timer."""
import types
import weakref

import numpy as np
import pytest
import torch

from harness import config
from harness import schedule as S
from harness.core import stage
from harness.core.executor import StageExecutor
from harness.core.sgd import SGD
from harness.trace import clock as C
from harness.trace import open_trace
from helpers import SMALL, Batches, declare_runs, meta, trace_frame

STEPS = 3


def raw(run_dir, kind, rank):
    return trace_frame(run_dir, kind, rank)


declare_runs(__name__, {
    **{m: (2, [*SMALL, "schedule=gpipe", f"pipeline.microbatches={m}", f"train.steps={STEPS}"])
       for m in (1, 2, 4)},
    "no_detach": (2, [*SMALL, "pipeline.detach=false", f"train.steps={STEPS}"])})


@pytest.fixture(scope="module")
def runs():
    """This module's runs (on 2 ranks), made with the session's other runs."""
    return Batches(__name__)


@pytest.fixture(params=[1, 2, 4])
def gpipe(request, runs):
    return runs[request.param], request.param


def test_backward_spans_tile_each_backward_call(gpipe):
    """Within one microbatch's backward on one rank the per-layer spans leave no gap: the
    AccumulateGrad and other autograd work between layers is compute (it was ~50-240 us of
    'idle' per gap before), for every m."""
    run, m = gpipe
    for rank in range(2):
        ev = raw(run, "events", rank)
        b = ev[ev["kind"] == "bwd"].sort_values("t0")
        for (step, mb), g in b.groupby(["step", "mb"]):
            t0, t1 = g["t0"].to_numpy(), g["t1"].to_numpy()
            assert (t0[1:] == t1[:-1]).all(), f"rank {rank} step {step} mb {mb}: gaps"
            assert (t1 - t0).sum() == t1[-1] - t0[0]
        assert b.groupby(["step", "mb"]).ngroups == STEPS * m


def test_optimizer_span_excludes_the_statistics(gpipe):
    run, _ = gpipe
    for rank in range(2):
        ev = raw(run, "events", rank)
        for step in range(STEPS):
            e = ev[ev["step"] == step]
            opt, norms = e[e["kind"] == "opt"], e[e["kind"] == "norms"]
            assert len(opt) == 1 and len(norms) == 1
            assert opt["t1"].iloc[0] <= norms["t0"].iloc[0]   # one after the other, disjoint


def test_no_detach_counts_the_kept_input_gradient(runs):
    """detach=false on 2 ranks: the receiving stage's retained graph keeps its input and the
    input's .grad every step. Pebbles never freed grow per step by the stage's activation bytes
    (meta.pebbles_theory, hand-derived from the layer shapes) plus the input gradient
    [batch, width] fp32, which is now a pebble of its own kind."""
    d = runs["no_detach"]
    mt = meta(d)
    peb = raw(d, "pebbles", 1)
    kept = peb[peb["t_free"].isna()]
    grad = kept[kept["kind"] == "in_grad"]
    batch, width = 32, 64                                          # helpers.SMALL
    assert sorted(grad["step"]) == list(range(STEPS))
    assert (grad["bytes"] == batch * width * 4).all()
    per_step = kept.groupby("step")["bytes"].sum()
    want = mt["pebbles_theory"]["bytes_per_microbatch"][1] + batch * width * 4
    assert (per_step == want).all(), per_step.tolist()
    assert not (raw(d, "pebbles", 0)["kind"] == "in_grad").any()  # stage 0 receives nothing


def _single_stage(overrides, tmp_path, timer=None):
    """Stage 0 of SMALL run as a one-rank pipeline (no MPI), traced into tmp_path."""
    cfg, sched = config.load_with_schedule([*SMALL, *overrides], world_size=1)
    st = stage.build(cfg, 0, sched.placement, cfg.data.batch_size // cfg.pipeline.microbatches)
    layers = st.layers
    opt = SGD(layers.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)   # as the harness
    clk = C.Clock()
    tracker, tracer, _, _ = open_trace(True, tmp_path, 0, timer or C.HostTimer(clk), clk.now,
                                       layers.parameters(), torch.device("cpu"), 1.0)
    ex = StageExecutor(st, sched, 0, p2p=None, tracer=tracer, tracker=tracker, optimizer=opt,
                       device=torch.device("cpu"), pipeline=cfg.pipeline, train=cfg.train,
                       trace=cfg.trace)
    return ex, tracer, sched[0]


def test_stage_0_input_is_released_with_its_pebble(tmp_path):
    """GPipe m=4 on one stage: once microbatch k's backward ran, its input tensor is gone (the
    pebble says freed; nothing else may hold it until the step ends)."""
    ex, tracer, acts = _single_stage(["schedule=gpipe", "pipeline.microbatches=4"], tmp_path)
    refs, dead_after_bwd = {}, {}
    fwd, bwd = ex.dispatch[S.FWD], ex.dispatch[S.BWD]

    def spy_fwd(a):
        refs[a.mb] = weakref.ref(ex.st.x_mb[a.mb])
        fwd(a)

    def spy_bwd(a):
        bwd(a)
        dead_after_bwd[a.mb] = refs[a.mb]() is None
    ex.dispatch[S.FWD], ex.dispatch[S.BWD] = spy_fwd, spy_bwd
    ex.run_step(0, acts)
    tracer.close()
    assert dead_after_bwd == {0: True, 1: True, 2: True, 3: True}


class FakeEventTimer:
    """A CUDA-like timer on CPU: marks are events with a device time (ms) that runs 5 ms behind
    the host's; resolve maps them with an anchor, as CudaTimer does (trace.clock)."""
    kind = "fake_event"

    def __init__(self):
        self.base_ns = 10**12

    def begin_step(self):
        pass

    def mark(self):
        e = types.SimpleNamespace(t_ms=(C.time.perf_counter_ns() - self.base_ns) / 1e6 - 5.0)
        return e

    def resolve(self, marks):
        return [m if isinstance(m, int) else self.base_ns + int(m.t_ms * 1e6) for m in marks]


def test_pebbles_are_timed_by_the_rank_timer(tmp_path):
    """With an event timer the pebbles' store/free times come from its marks (device clock,
    5 ms behind the host here), like the spans, not from a host clock read."""
    timer = FakeEventTimer()
    ex, tracer, acts = _single_stage([], tmp_path, timer)
    h0 = C.time.perf_counter_ns()
    ex.run_step(0, acts)
    tracer.flush()
    h1 = C.time.perf_counter_ns()
    tracer.close()
    peb, ev = raw(tmp_path, "pebbles", 0), raw(tmp_path, "events", 0)
    assert len(peb) and peb["t_free"].notna().all()
    lo, hi = h0 - 5_000_000, h1 - 5_000_000                        # the device's clock
    for c in ("t_store", "t_free"):
        assert ((peb[c] >= lo) & (peb[c] <= hi)).all(), c
    fwd0 = ev[(ev["kind"] == "fwd") & (ev["layer"] == 0)].iloc[0]
    first = peb[peb["layer"] == 0].iloc[0]
    assert fwd0["t0"] <= first["t_store"] <= fwd0["t1"]            # saved during its forward
    assert np.all(peb["t_store"] <= peb["t_free"])
