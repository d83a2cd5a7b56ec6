"""Issue 10/14 analyses on hand-built events whose answers are worked out in the comments:
late-receiver sends, the timeline's step start, clock quality, phases, critical path, blame."""
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis import load_run, metrics as M, style  # noqa: E402
from analysis.chrome import TID, chrome_json  # noqa: E402
from analysis.measure import blame as B, critical as C, waits as W  # noqa: E402
from analysis.measure.phases import phase_idle  # noqa: E402
from analysis.plots import timeline  # noqa: E402
from harness.runformat import LANE  # noqa: E402
from harness.synthetic import make_run  # noqa: E402


def frame(rows):
    """rows: (rank, kind, start, end[, tb, pair[, step]]) -> an events frame like load_run's."""
    out = []
    for r in rows:
        rank, kind, s, e = r[:4]
        tb = r[4] if len(r) > 4 and r[4] is not None else (s if kind in ("send", "recv")
                                                          else np.nan)
        out.append({"rank": rank, "step": r[6] if len(r) > 6 else 0, "mb": 0, "layer": -1,
                    "kind": kind, "lane": LANE[kind], "start": float(s), "end": float(e),
                    "tb": float(tb), "peer": -1, "tag": -1, "bytes": 0,
                    "pair": r[5] if len(r) > 5 else pd.NA})
    return pd.DataFrame(out)


# -- A: late receiver ----------------------------------------------------------------------------
def test_send_split_late_receiver_eager_and_nonblocking():
    ev = frame([
        (0, "send", 1, 5, 1, "rdv"), (1, "recv", 3, 5.2, 3, "rdv"),    # posted at 3: wait 2, xfer 2
        (0, "send", 6, 6.5, 6, "early"), (1, "recv", 5.5, 6.6, 5.5, "early"),  # posted first
        (0, "send", 7, 7.01, 7, "eager"), (1, "recv", 9, 9.1, 9, "eager"),    # buffered: no wait
        (0, "send", 2, 12, 10, "nb"), (1, "recv", 11, 12.1, 11, "nb"),  # Isend at 2, Wait at 10
    ])
    ss = W.send_split(ev).set_index("pair")
    assert ss.loc["rdv", ["wait", "transfer"]].tolist() == pytest.approx([2, 2])
    assert ss.loc["early", ["wait", "transfer"]].tolist() == pytest.approx([0, 0.5])
    assert ss.loc["eager", ["wait", "transfer"]].tolist() == pytest.approx([0, 0.01])
    assert ss.loc["nb", ["wait", "transfer"]].tolist() == pytest.approx([1, 1])
    t = M.step_table(ev).set_index("rank")
    # the parts of the blocked send add up to the blocked time (a second way to the number)
    assert t.loc[0, "send_wait"] == pytest.approx(3.0)
    assert t.loc[0, "send_wait"] + t.loc[0, "send_transfer"] == pytest.approx(t.loc[0, "send"])


# -- B: one step definition ---------------------------------------------------------------------
def test_timeline_starts_a_step_at_its_compute_not_an_early_receive():
    # step 0: r0 F 0-2, r1 F 2-3 ... r0 B until 8; rank 1 posts step 1's receive at 5, while
    # rank 0 is still in step 0's backward; step 1's first compute is rank 0's F at 9
    ev = frame([(0, "fwd", 0, 2, None, pd.NA, 0), (1, "fwd", 2.2, 3, None, pd.NA, 0),
                (0, "bwd", 4, 8, None, pd.NA, 0), (1, "bwd", 3, 4, None, pd.NA, 0),
                (1, "recv", 5, 11.2, 5, "A1", 1), (0, "fwd", 9, 11, None, pd.NA, 1),
                (0, "send", 11, 11.1, 11, "A1", 1), (1, "fwd", 11.2, 12, None, pd.NA, 1)])
    win = M.step_windows(ev)
    assert win.loc[1, "start"] == 9.0
    with plt.rc_context(style.RC):
        fig, (ax,) = timeline(ev, [0, 1])
        x = sorted(ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == ":")
        scale, _ = style.time_unit(12)
        assert x == pytest.approx([0.0, 9.0 * scale])     # before: 0 and 5 (the early receive)
        plt.close(fig)


# -- C: clock quality -----------------------------------------------------------------------------
def _with_clock(path, rtt_ns, offsets=(0, 0)):
    meta = json.loads((path / "meta.json").read_text())
    meta["clock"]["estimates"] = [
        {"rank": 1, "phase": "start", "t_local": 0, "offset_ns": offsets[0], "rtt_ns": rtt_ns},
        {"rank": 1, "phase": "end", "t_local": 10**9, "offset_ns": offsets[1], "rtt_ns": rtt_ns}]
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("rtt_ns, offsets, flagged", [
    (100_000, (0, 0), True),       # ±50 µs against a 100 µs transfer: 50 %
    (2_000, (0, 0), False),        # ±1 µs: 1 %
    (2_000, (0, 30_000), True),    # same host, offsets 30 µs apart: the estimates disagree
])
def test_clock_flag_when_uncertainty_is_a_large_share_of_transfer(tmp_path, capsys, rtt_ns,
                                                                   offsets, flagged):
    from analysis.pebble import main
    d = _with_clock(make_run(tmp_path / "r", p=2, steps=3, xfer=100_000), rtt_ns, offsets)
    assert main([str(d), "-q", "--no-trace", "--format", "none"]) == 0   # the note: below
    out = capsys.readouterr().out
    assert ("WARNING: clock uncertainty" in out) is flagged
    q = json.loads((d / "analysis" / "metrics.json").read_text())["clock"]
    assert q["rank_uncertainty_s"]["1"] == pytest.approx((rtt_ns / 2 + abs(offsets[1])) / 1e9)
    assert q["split_reliable"] is (not flagged)
    assert (W.warning_line(q) is not None) is flagged


def test_timeline_prints_the_clock_note(tmp_path):
    run = load_run(make_run(tmp_path / "r", p=2, steps=2))
    with plt.rc_context(style.RC):
        fig, (ax,) = timeline(run.events, note="clock uncertainty ±50 µs")
        assert "clock uncertainty" in ax.get_title(loc="left")
        plt.close(fig)


# -- F: phases ------------------------------------------------------------------------------------
def test_phases_hand_frame_and_synthetic_naive(tmp_path):
    # one rank, window [0, 8]: F 0-1, B 2-3, F 4-5, B 6-7 -> a = 2, b = 5
    ev = frame([(0, "fwd", 0, 1), (0, "bwd", 2, 3), (0, "fwd", 4, 5), (0, "bwd", 6, 7),
                (1, "opt", 7.5, 8)])
    p = phase_idle(ev, M.step_windows(ev)).set_index("rank")
    assert p.loc[0, ["idle_warmup", "idle_steady", "idle_cooldown"]].tolist() == \
        pytest.approx([1, 1, 2])
    # naive p=2 (test_analysis_metrics' hand numbers): rank 0 F 0-2, B 9.2-13.2, opt -13.7;
    # rank 1 F 2.1-4.1, loss 4.1-4.6, B 4.6-9.1, opt 9.2-9.7; window [0, 13.7] ms
    run = load_run(make_run(tmp_path / "r", p=2, steps=3))
    t = M.step_table(run.events, run.pebbles)
    t = t[t["step"] == 1].set_index("rank")
    ms = t[["idle_warmup", "idle_steady", "idle_cooldown"]] * 1e3
    assert ms.loc[0].tolist() == pytest.approx([0, 7.2, 0])
    assert ms.loc[1].tolist() == pytest.approx([2.1, 0, 4.1])
    assert t[["idle_warmup", "idle_steady", "idle_cooldown"]].sum(axis=1).tolist() == \
        pytest.approx(t["idle"].tolist())


# -- D: critical path -----------------------------------------------------------------------------
def test_critical_path_naive_hand_numbers_and_tiling(tmp_path):
    run = load_run(make_run(tmp_path / "r", p=2, steps=3))
    path = C.critical_path(run.events, [1])
    comp = C.composition(path).set_index(["rank", "kind"])["seconds"] * 1e3
    # r0 F 2 + B 4 + opt 0.5; r1 F 2 + loss 0.5 + B 4.5; one transfer per message
    assert comp.to_dict() == pytest.approx({(0, "compute"): 6.5, (0, "transfer"): 0.1,
                                            (1, "compute"): 7.0, (1, "transfer"): 0.1})
    win = M.step_windows(run.events[run.events["step"] == 1])
    assert (path["end"] - path["start"]).sum() == pytest.approx(win.loc[1, "span"])
    assert np.allclose(path["start"].to_numpy()[1:], path["end"].to_numpy()[:-1])  # no holes


def test_critical_path_skips_a_rank_that_is_not_on_it(tmp_path):
    # 3 ranks: r0 F 0-4 -> r1 (recv) F 4.1-5 -> r2 (recv) F 5.1-9; r1 also has a long opt
    # 5-6 that nobody waits for. Path: r0 F, transfer, r1 F, transfer, r2 F.
    ev = frame([(0, "fwd", 0, 4), (0, "send", 4, 4.1, 4, "a"), (1, "recv", 0, 4.1, 0, "a"),
                (1, "fwd", 4.1, 5), (1, "send", 5, 5.1, 5, "b"), (1, "opt", 5.1, 6),
                (2, "recv", 0, 5.1, 0, "b"), (2, "fwd", 5.1, 9)])
    path = C.critical_path(ev)
    got = [(r, k, round(s, 6), round(e, 6)) for r, k, s, e in
           path[["rank", "kind", "start", "end"]].itertuples(index=False)]
    assert got == [(0, "compute", 0, 4), (1, "transfer", 4, 4.1), (1, "compute", 4.1, 5),
                   (2, "transfer", 5, 5.1), (2, "compute", 5.1, 9)]


def test_critical_path_on_timeline_and_in_chrome_trace(tmp_path):
    run = load_run(make_run(tmp_path / "r", p=3, m=2, schedule="1f1b", steps=3))
    path = C.critical_path(run.events)
    with plt.rc_context(style.RC):
        fig, (ax,) = timeline(run.events, [1, 2], critical=path)
        lines = [ln for ln in ax.lines if ln.get_gid() == "critical-path"]
        assert len(lines) == 2
        plt.close(fig)
    tr = json.loads(chrome_json(run.events, run.pebbles, run.memory, run.meta, path))
    crit = [e for e in tr["traceEvents"] if e.get("cat") == "critical"]
    assert len(crit) == len(path) and all(e["tid"] == TID["critical"] for e in crit)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in tr["traceEvents"]
             if e.get("name") == "thread_name"}
    assert names[(0, TID["critical"])] == "critical path"
    # per step the slices' durations add up to the step's span
    dur = pd.DataFrame([(e["args"]["step"], e["dur"]) for e in crit], columns=["s", "d"])
    spans = M.step_windows(run.events)["span"] * 1e6
    assert dur.groupby("s")["d"].sum().to_numpy() == pytest.approx(
        spans.loc[sorted(dur["s"].unique())].to_numpy(), abs=0.01)


# -- E: blame -------------------------------------------------------------------------------------
def test_blame_passes_waits_up_the_chain():
    # r0 F 0-10 then sends; r1 waits for it, F 10.1-11, sends; r2 waits 0-11 (until r1 sends)
    ev = frame([(0, "fwd", 0, 10), (0, "send", 10, 10.1, 10, "a"), (1, "recv", 0, 10.1, 0, "a"),
                (1, "fwd", 10.1, 11), (1, "send", 11, 11.1, 11, "b"),
                (2, "recv", 0, 11.1, 0, "b"), (2, "fwd", 11.1, 12)])
    bl = B.blame(ev)
    got = bl.groupby(["victim", "rank", "kind"])["seconds"].sum().to_dict()
    # r1 waited [0, 10] on r0's forward; r2 waited [0, 11]: [0, 10] r1 was itself waiting
    # for r0 (passed on), [10, 10.1] r1 was receiving, [10.1, 11] r1 computed
    assert got == pytest.approx({(1, 0, "fwd"): 10, (2, 0, "fwd"): 10, (2, 1, "transfer"): 0.1,
                                 (2, 1, "fwd"): 0.9})
    s = B.summary(bl, [0], [0, 1, 2])
    assert s["worst_offender"]["rank"] == 0 and s["worst_offender"]["caused_s"] == \
        pytest.approx(20)


def test_blame_on_synthetic_naive_run(tmp_path):
    # hand numbers: rank 0 waits 7.0 ms for rank 1's F 2 + loss 0.5 + B 4.5;
    # rank 1 waits 2.0 ms for rank 0's forward
    run = load_run(make_run(tmp_path / "r", p=2, steps=3))
    bl = B.blame(run.events)
    b1 = bl[bl["step"] == 1].groupby(["rank", "kind"])["seconds"].sum() * 1e3
    assert b1.to_dict() == pytest.approx({(0, "fwd"): 2.0, (1, "bwd"): 4.5, (1, "fwd"): 2.0,
                                          (1, "loss"): 0.5})
    t = M.step_table(run.events)
    t = t[t["step"] == 1].set_index("rank")
    # second way: what rank 1 caused is rank 0's late-sender wait
    assert b1.loc[1].sum() == pytest.approx(t.loc[0, "recv_wait"] * 1e3)
