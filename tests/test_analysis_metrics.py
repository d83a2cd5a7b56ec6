"""Metrics on hand-made traces whose answers are computed by hand in the comments."""
import numpy as np
import pandas as pd
import pytest

from analysis import metrics as M
from analysis.measure import intervals as iv
from analysis.read.load import clock_offset_ns, load_run

from harness.runformat import LANE
from harness.synthetic import make_run


def frame(rows):
    """rows: (rank, kind, start, end[, tb, pair]) -> an events frame as load_run returns it."""
    out = []
    for r in rows:
        rank, kind, s, e = r[:4]
        tb = r[4] if len(r) > 4 else (s if kind in ("send", "recv") else np.nan)
        pair = r[5] if len(r) > 5 else pd.NA
        out.append({"rank": rank, "step": 0, "mb": 0, "layer": -1, "kind": kind,
                    "lane": LANE[kind], "start": float(s), "end": float(e), "tb": float(tb),
                    "peer": -1, "tag": -1, "bytes": 0, "pair": pair})
    return pd.DataFrame(out)


def test_compute_is_a_union_and_idle_is_span_minus_compute():
    ev = frame([(0, "fwd", 0, 1), (0, "fwd", 0.5, 2), (0, "bwd", 3, 4),   # union: 2 + 1 = 3
                (1, "fwd", 2, 7), (1, "opt", 9, 10)])                     # 5 + 1 = 6
    t = M.step_table(ev).set_index("rank")
    assert t.loc[0, "span"] == pytest.approx(10.0)       # first start 0, last end 10
    assert t.loc[0, "compute"] == pytest.approx(3.0)
    assert t.loc[0, "idle"] == pytest.approx(7.0)
    assert t.loc[1, "idle"] == pytest.approx(4.0)
    assert t.loc[1, "utilisation"] == pytest.approx(0.6)
    s = M.summarize(ev, pd.DataFrame(columns=["rank", "step", "stored", "freed", "bytes"]),
                    pd.DataFrame(columns=["rank", "time", "source", "bytes"]),
                    {"world_size": 2, "schedule": {"name": "naive", "microbatches": 1}}, [0])
    assert s["pipeline"]["bubble_measured"] == pytest.approx((0.7 + 0.4) / 2)
    assert s["pipeline"]["bubble_theory"] == pytest.approx(0.5)
    assert "only one step" in s["steps"]["note"]


def test_late_sender_early_sender_nonblocking_and_violation():
    ev = frame([
        (0, "send", 4, 4.5, 4, "late"), (1, "recv", 1, 5, 1, "late"),      # wait 3, transfer 1
        (0, "send", 0.5, 0.6, 0.5, "early"), (1, "recv", 1, 1.5, 1, "early"),  # wait 0, xfer .5
        (0, "send", 3, 3.1, 3, "nb"), (1, "recv", 0, 5, 2, "nb"),          # Irecv at 0, Wait at 2
        (0, "send", 2, 2.1, 2, "bad"), (1, "recv", 0.5, 1.0, 0.5, "bad"),  # ends before send
    ])
    rs = M.recv_split(ev).set_index("pair")
    assert rs.loc["late", ["wait", "transfer"]].tolist() == pytest.approx([3, 1])
    assert rs.loc["early", ["wait", "transfer"]].tolist() == pytest.approx([0, 0.5])
    # non-blocking: only [tb, end] counts; wait = min(3, 5) - 2 = 1, transfer = 5 - 3 = 2
    assert rs.loc["nb", ["wait", "transfer"]].tolist() == pytest.approx([1, 2])
    assert bool(rs.loc["bad", "violation"]) and rs["violation"].sum() == 1
    assert rs.loc["bad", "transfer"] == 0.0            # clipped: the clocks are wrong, not time
    c = M.clock_check({"clock": {"estimates": [{"rtt_ns": 2000}, {"rtt_ns": 5000}]}}, rs)
    assert c == {"uncertainty_s": 2.5e-6, "violations": 1, "matched_pairs": 4,
                 "unmatched_receives": 0}


def test_overlap_is_compute_cap_comm_over_comm():
    # compute [0,4]; an isend in flight [3,6] and a recv [5,7]: comm union [3,7] = 4,
    # compute ∩ comm = [3,4] = 1 -> 25 %
    ev = frame([(0, "fwd", 0, 4), (0, "send", 3, 6, 5.5, "x"), (0, "recv", 5, 7, 6, "y")])
    t = M.step_table(ev)
    assert t.loc[0, "overlap_pct"] == pytest.approx(25.0)
    assert t.loc[0, "send"] == pytest.approx(0.5)      # blocked part only: [5.5, 6]


def test_peak_activation_bytes_frees_first_on_ties():
    peb = pd.DataFrame({"rank": 0, "step": 0, "mb": 0, "layer": [0, 1, 2, 3], "kind": "saved",
                        "bytes": [100, 50, 70, 10], "stored": [0.0, 1.0, 3.0, 4.0],
                        "freed": [5.0, 3.0, 6.0, np.nan]})
    lb = M.live_bytes(peb)
    # 100 -> 150 -> (free 50, store 70 at t=3) 170 -> 180 -> 80 -> 10 ; never 220
    assert lb["bytes"].max() == 180
    assert lb["bytes"].tolist() == [100, 150, 100, 170, 180, 80, 10]
    ev = frame([(0, "fwd", 0, 6)])
    assert M.step_table(ev, peb).loc[0, "peak_act_bytes"] == 180


def test_clock_interpolation_known_offset_and_drift():
    meta = {"clock": {"estimates": [
        {"rank": 1, "phase": "start", "t_local": 1000, "offset_ns": 500, "rtt_ns": 10},
        {"rank": 1, "phase": "start", "t_local": 1100, "offset_ns": 9999, "rtt_ns": 99},
        {"rank": 1, "phase": "end", "t_local": 3000, "offset_ns": 900, "rtt_ns": 10}]}}
    t = np.array([1000, 2000, 3000, 4000])
    # the min-rtt start estimate wins; linear between, the same line outside
    assert clock_offset_ns(meta, 1, t).tolist() == [500, 700, 900, 1100]
    assert clock_offset_ns(meta, 0, t).tolist() == [0, 0, 0, 0]
    one = {"clock": {"estimates": [{"rank": 2, "phase": "start", "t_local": 5,
                                    "offset_ns": -42, "rtt_ns": 1}]}}
    assert clock_offset_ns(one, 2, t).tolist() == [-42] * 4


def test_loader_removes_known_skew_and_drift(tmp_path):
    ref = load_run(make_run(tmp_path / "ref", p=2, steps=2))
    # rank 1's clock is 5 ms ahead at the start and 5.2 ms at the end (drift)
    sk = load_run(make_run(tmp_path / "skew", p=2, steps=2, clocks={1: (5_000_000, 5_200_000)}))
    a = ref.events.sort_values(["rank", "start", "kind"]).reset_index(drop=True)
    b = sk.events.sort_values(["rank", "start", "kind"]).reset_index(drop=True)
    assert np.abs(a["start"] - b["start"]).max() < 3e-9   # ns rounding only
    assert np.abs(a["end"] - b["end"]).max() < 3e-9
    assert M.recv_split(sk.events)["violation"].sum() == 0


def test_synthetic_naive_run_matches_hand_numbers(tmp_path):
    # naive, p=2, 2 layers per stage; fwd 1 ms, bwd 2 ms, loss 0.5+0.5, opt 0.5, xfer 0.1:
    # rank 0: F 0-2, send 2-2.1, recv 2.1-9.2 (send at 9.1), B 9.2-13.2, opt -13.7
    # rank 1: recv 0-2.1 (send at 2.0), F 2.1-4.1, loss 4.1-4.6, B 4.6-9.1, send, opt 9.2-9.7
    run = load_run(make_run(tmp_path / "r", p=2, steps=3))
    t = M.step_table(run.events, run.pebbles)
    t = t[t["step"] == 1].set_index("rank")
    assert t["span"].tolist() == pytest.approx([13.7 * 1e-3] * 2)
    assert t["compute"].tolist() == pytest.approx([6.5e-3, 7.5e-3])
    assert t["recv_wait"].tolist() == pytest.approx([7.0e-3, 2.0e-3])
    assert t["recv_transfer"].tolist() == pytest.approx([0.1e-3, 0.1e-3])
    s = M.summarize(run.events, run.pebbles, run.memory, run.meta, run.steps)
    assert s["steps"]["warmup"] == [0] and s["steps"]["steady"] == [1, 2]
    assert s["pipeline"]["bubble_measured"] == pytest.approx((7.2 + 6.2) / 2 / 13.7)
    for r in s["per_rank"]:  # measured peak equals the schedule's analytic peak
        assert r["peak_act_bytes"] == r["peak_act_theory"]
        assert r["peak_device_bytes"]["rss"] > 100 << 20


def test_bubble_theory_and_steady_steps():
    assert M.bubble_theory("naive", 4, 1) == pytest.approx(0.75)
    assert M.bubble_theory("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert M.bubble_theory("1f1b", 2, 4) == pytest.approx(1 / 5)
    assert M.bubble_theory("zb", 2, 4) is None
    assert M.steady([3, 1, 2])[:2] == ([1], [2, 3])


def test_interval_union_and_gaps():
    g, s, e = iv.union([0, 0, 0, 1], [0, 1, 5, 2], [2, 3, 6, 4])
    assert list(zip(g, s, e)) == [(0, 0, 3), (0, 5, 6), (1, 2, 4)]
    assert iv.measure([0, 0, 1], [0, 1, 0], [2, 3, 1], 3).tolist() == [3, 1, 0]
    g, s, e = iv.gaps([0, 0], [1, 5], [2, 6], [0], [10])
    assert list(zip(s, e)) == [(0, 1), (2, 5), (6, 10)]
    g, s, e = iv.gaps([0], [1], [2], [0, 0], [10, 10])   # group 1 has no interval at all
    assert list(zip(g, s, e)) == [(0, 0, 1), (0, 2, 10), (1, 0, 10)]
