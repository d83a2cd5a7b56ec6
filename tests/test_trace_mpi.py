"""Per-rank traces of real 2- and 3-rank runs tell the truth: every span is there, lanes do not
overlap, sends pair with receives, pebbles add up to the layer shapes, clocks align."""
import json

import numpy as np
import pytest

from analysis import load_run
from helpers import SMALL, Batches, declare_runs, meta, run_harness, trace_frame

STEPS = 3
LAYERS, WIDTH, IN, CLASSES, BATCH = 6, 64, 32, 10, 32  # must match helpers.SMALL


declare_runs(__name__, {
    **{n: (n, [*SMALL, f"train.steps={STEPS}"]) for n in (2, 3)},
    "skew": (2, [*SMALL, "train.steps=3", "debug.clock_rank=1", "debug.clock_offset_ms=40",
                 "debug.clock_drift_ppm=300"])})


@pytest.fixture(scope="module", params=[2, 3])
def run(request):
    return Batches(__name__)[request.param]


def raw(run_dir, kind, rank):
    return trace_frame(run_dir, kind, rank)


def test_every_step_has_the_expected_spans_on_every_rank(run):
    m = meta(run)
    for rank, (first, end) in enumerate(m["split"]):
        ev = raw(run, "events", rank)
        last, p = rank == m["world_size"] - 1, m["world_size"]
        for step in range(STEPS):
            e = ev[ev["step"] == step]
            count = e["kind"].value_counts().to_dict()
            layers = list(range(first, end))
            assert sorted(e.loc[e["kind"] == "fwd", "layer"]) == layers
            bwd_layers = layers + ([LAYERS] if last else [])   # the loss's backward on the last
            assert sorted(e.loc[e["kind"] == "bwd", "layer"]) == bwd_layers
            assert count.get("loss", 0) == (1 if last else 0)
            assert count.get("opt") == 1 and count.get("step") == 1
            # naive: activation out and gradient in on all but the last; the reverse on all but the first
            assert count.get("send", 0) == (rank < p - 1) + (rank > 0)
            assert count.get("recv", 0) == (rank < p - 1) + (rank > 0)


def test_spans_of_one_lane_never_overlap(run):
    for rank in range(meta(run)["world_size"]):
        ev = raw(run, "events", rank)
        for lane, kinds in {"compute": ["fwd", "bwd", "loss", "opt"], "send": ["send"],
                            "recv": ["recv"]}.items():
            e = ev[ev["kind"].isin(kinds)].sort_values("t0")
            assert (e["t1"] >= e["t0"]).all()
            gaps = e["t0"].to_numpy()[1:] - e["t1"].to_numpy()[:-1]
            assert (gaps >= 0).all(), f"rank {rank} {lane}: overlapping spans"


def test_every_send_pairs_with_one_receive_of_equal_bytes_and_clocks_hold(run):
    r = load_run(run)
    ev = r.events
    sends = ev[ev["kind"] == "send"].set_index("pair")
    recvs = ev[ev["kind"] == "recv"].set_index("pair")
    assert sends.index.is_unique and recvs.index.is_unique
    assert set(sends.index) == set(recvs.index)
    p = meta(run)["world_size"]
    assert len(sends) == STEPS * 2 * (p - 1)
    j = sends.merge(recvs, left_index=True, right_index=True, suffixes=("_s", "_r"))
    assert (j["bytes_s"] == j["bytes_r"]).all()
    assert (j["bytes_s"] == BATCH * WIDTH * 4).all()
    assert (j["peer_s"] == j["rank_r"]).all() and (j["peer_r"] == j["rank_s"]).all()
    # one physical clock: aligned, a receive ends after its send starts, up to the alignment's
    # own bound (Cristian: |error| <= rtt / 2 of the estimate used; the host's load sets rtt)
    tol = max(e["rtt_ns"] for e in meta(run)["clock"]["estimates"]) / 2 / 1e9
    assert (j["end_r"] >= j["start_s"] - tol).all(), "a receive ended before its send started"


def stage_bytes(first, end, last):
    """Saved activations per step from the layer shapes alone (not from harness code): the
    stage input (the first Linear saves it), each ReLU output (shared with the next Linear),
    and on the last stage log-softmax [B, C] fp32 + int64 targets + nll_loss's fp32 total weight."""
    widths = [IN] + [WIDTH] * (LAYERS - 1) + [CLASSES]
    b = BATCH * widths[first] * 4
    b += sum(BATCH * widths[i + 1] * 4 for i in range(first, end) if i < LAYERS - 1)
    if last:
        b += BATCH * CLASSES * 4 + BATCH * 8 + 4
    return b


def test_pebble_bytes_per_stage_and_step_equal_the_layer_shapes_and_all_are_freed(run):
    m = meta(run)
    for rank, (first, end) in enumerate(m["split"]):
        peb = raw(run, "pebbles", rank)
        ev = raw(run, "events", rank)
        want = stage_bytes(first, end, rank == m["world_size"] - 1)
        assert m["pebbles_theory"]["peak_bytes"][rank] == want
        for step in range(STEPS):
            p = peb[peb["step"] == step]
            assert p["bytes"].sum() == want, f"rank {rank} step {step}"
            step_end = ev[(ev["step"] == step) & (ev["kind"] == "step")]["t1"].item()
            assert p["t_free"].notna().all() and (p["t_free"] <= step_end).all()
            assert (p["t_free"] >= p["t_store"]).all()
            assert set(p["layer"]) <= set(range(first, end)) | {LAYERS}


def test_memory_samples_and_meta_describe_the_trace(run):
    m = meta(run)
    for rank in range(m["world_size"]):
        mem = raw(run, "memory", rank)
        assert len(mem) > 0 and set(mem["source"]) == {"rss"} and (mem["bytes"] > 0).all()
        info = m["ranks"][rank]
        assert info["timer"] == "perf_counter_ns" and info["memory_sources"]["rss"] == "ok"
    assert m["trace"] == {"enabled": True, "format": 2, "per_layer": True, "sample_interval_ms": 10.0}
    est = m["clock"]["estimates"]
    assert sorted((e["rank"], e["phase"]) for e in est) == sorted(
        (r, ph) for r in range(1, m["world_size"]) for ph in ("start", "end"))
    assert all(e["rtt_ns"] > 0 for e in est)


def test_an_injected_clock_offset_and_drift_are_recovered():
    d = Batches(__name__)["skew"]
    m = meta(d)
    knob = m["ranks"][1]["clock_knob"]
    assert knob["offset_ns"] == 40_000_000

    def true_offset(t_local):  # invert local = t + skew + drift * (t - origin)
        drift = knob["drift_ppm"] * 1e-6
        t = (t_local - knob["offset_ns"] + drift * knob["origin_ns"]) / (1 + drift)
        return t - t_local

    est = [e for e in m["clock"]["estimates"] if e["rank"] == 1]
    assert len(est) == 2
    for e in est:
        err = e["offset_ns"] - true_offset(e["t_local"])
        # the estimate's own bound (Cristian): the true offset lies within rtt / 2 of it
        assert abs(err) <= e["rtt_ns"] / 2 + 1_000, f"{e['phase']}: off by {err / 1e3:.1f} us"
    # and the analysis, aligning with those estimates, sees no receive before its send
    r = load_run(d)
    ev = r.events
    j = ev[ev.kind == "send"].merge(ev[ev.kind == "recv"], on="pair", suffixes=("_s", "_r"))
    tol = max(e["rtt_ns"] for e in est) / 2 / 1e9
    assert (j["end_r"] >= j["start_s"] - tol).all()


def test_a_crashed_run_keeps_its_trace_up_to_the_last_completed_step(tmp_path):
    d = tmp_path / "crash"
    proc = run_harness(2, *SMALL, "train.steps=20", "debug.fail_rank=0", "debug.fail_step=3",
                       f"run.dir={d}", timeout=60)
    assert proc.returncode != 0
    for rank in (0, 1):
        ev = raw(d, "events", rank)
        done = sorted(ev.loc[ev["kind"] == "step", "step"])
        assert done[:3] == [0, 1, 2]
    r = load_run(d)  # the analysis reads it, and says what is missing
    assert r.meta["status"] == "failed" and set(r.steps) >= {0, 1, 2}
    assert json.loads((d / "meta.json").read_text())["error"]["rank"] == 0
    assert np.isfinite(r.events["start"]).all()
