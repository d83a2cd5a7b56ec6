"""The calibration recovers costs set by hand, and the prediction is the median step.

harness.synthetic plays schedules through the simulator on a cost model given by hand: per
layer compute a + b·rows (t_*, per_row), the executor's gaps per transition, a fixed time per
message. Calibrated on one such run, the what-if must read back exactly those costs and
predict the other configurations' measured step to rounding."""
from __future__ import annotations

import pytest

from analysis import load_run
from analysis.predict.actions import action_gaps, action_times, schedule_table
from analysis.predict.calibrate import calibrate
from analysis.whatif import measured, predict
from harness import schedule as S
from harness.synthetic import MS, make_run

US = MS // 1000
GAPS = {("fwd", "send_act"): 40 * US, ("recv_act", "fwd"): 30 * US, ("fwd", "bwd"): 15 * US,
        ("bwd", "send_grad"): 60 * US, ("recv_grad", "bwd"): 8 * US, ("send_act", "fwd"): 11 * US,
        ("send_act", "recv_grad"): 50 * US, ("bwd", "recv_grad"): 55 * US,
        ("send_grad", "bwd"): 20 * US, ("bwd", "opt"): 25 * US, ("send_grad", "opt"): 5 * US,
        ("fwd", "irecv_grad"): 43 * US, ("irecv_grad", "isend_act"): 24 * US,
        ("isend_act", "wait_send_act"): 13 * US, ("wait_send_act", "wait_recv_grad"): 5 * US,
        ("wait_recv_grad", "bwd"): 4 * US, ("bwd", "fwd"): 40 * US,
        ("bwd", "irecv_act"): 65 * US, ("irecv_act", "isend_grad"): 26 * US,
        ("isend_grad", "wait_send_grad"): 13 * US, ("wait_send_grad", "wait_recv_act"): 6 * US,
        ("wait_recv_act", "fwd"): 20 * US}
# a layer: 0.2 ms + 4 µs per row forward, 0.3 ms + 9 µs per row backward; the loss 50 µs + 1
PER_ROW = {"fwd": 4 * US, "bwd": 9 * US, "loss": US}
COSTS = dict(t_fwd=MS // 5, t_bwd=3 * MS // 10, t_loss=MS // 20, t_opt=MS // 2, per_row=PER_ROW,
             gaps=GAPS, batch=64, layers_per_stage=3)


def _run(tmp_path, name, **kw):
    kw = {**COSTS, "steps": 5, **kw}
    return load_run(make_run(tmp_path / name, **kw))


def test_costs_set_by_hand_are_read_back_exactly(tmp_path):
    run = _run(tmp_path, "g2", schedule="gpipe", m=2, xfer=70 * US)
    cal = calibrate([run])
    assert len(cal.steps) == 4                    # steps 1..4: step 0 is warm-up
    st = cal.steps[0]
    rows = 32
    for layer in range(6):                        # every block's busy time per action
        assert st.layer[layer, "fwd"] == pytest.approx((0.2e-3 + 4e-6 * rows), abs=1e-12)
        assert st.layer[layer, "bwd"] == pytest.approx((0.3e-3 + 9e-6 * rows), abs=1e-12)
    assert st.layer[6, "fwd"] == pytest.approx(50e-6 + 1e-6 * rows, abs=1e-12)   # the loss
    assert st.opt == {0: pytest.approx(0.5e-3), 1: pytest.approx(0.5e-3)}
    measured_gaps = {(p_, k): v for (_, p_, k), v in st.gap.items()}
    for key, v in measured_gaps.items():          # each transition's gap, as set (0 unset)
        assert v == pytest.approx(GAPS.get(key, 0) / 1e9, abs=1e-12), key
    assert len(measured_gaps) == 12 and measured_gaps["fwd", "send_act"] > 0
    assert st.msg == {4096: pytest.approx(70e-6, abs=1e-12)}       # every message 70 µs
    assert all(e == pytest.approx(0, abs=1e-12) for e, _ in st.extra.values())


NAIVE_KW = dict(xfer=0, gaps=30 * US)


@pytest.fixture(scope="module")
def naive_cal(tmp_path_factory):
    """The calibration of one naive run with set-up block times (predict leaves it as it is)."""
    return calibrate([_run(tmp_path_factory.mktemp("cal"), "n1", schedule="naive", m=1,
                           block_times=True, **NAIVE_KW)])


@pytest.mark.parametrize("target", [("gpipe", 2, False), ("gpipe", 4, False), ("1f1b", 8, False),
                                    ("1f1b", 4, True), ("naive", 1, False)])
def test_one_run_predicts_other_microbatch_counts_from_its_block_times(tmp_path, naive_cal,
                                                                       target):
    # compute a + b·rows, not proportional: only the set-up block times say how a block's
    # cost changes with rows. One gap for every transition: the target's transitions that
    # the naive run never made (send_act -> fwd ...) are taken from the ones it made, and
    # said so. Messages free here (their model is checked below)
    cal = naive_cal
    sch, m, ov = target
    truth = measured(_run(tmp_path, "truth", schedule=sch, m=m, overlap=ov, **NAIVE_KW))
    pred = predict(cal, sch, m, overlap=ov)
    assert pred.step_s == pytest.approx(truth["step_s"], rel=1e-9)
    assert pred.bubble == pytest.approx(truth["bubble"], abs=1e-9)
    assert pred.peak_act_bytes == [int(x) for x in truth["peak_act_bytes"]]
    assert not [a for a in pred.assumed if a.startswith("compute")]   # measured at set-up
    assert bool([a for a in pred.assumed if a.startswith("gap")]) == (sch != "naive")


def test_without_block_times_one_run_assumes_proportional_and_says_so(tmp_path):
    cal = calibrate([_run(tmp_path, "n1", schedule="naive", m=1, xfer=0)])
    pred = predict(cal, "gpipe", 4)
    assert any("proportional to rows" in a for a in pred.assumed)


def test_two_message_sizes_fit_their_time_exactly(tmp_path):
    # messages of 4096 bytes at m=1 and 1024 at m=4 (scale_rows), 0.1 ms per whole batch
    runs = [_run(tmp_path, f"m{m}", schedule="gpipe", m=m, scale_rows=True, gaps=None,
                 per_row=None) for m in (1, 4)]
    cal = calibrate(runs)
    truth = measured(_run(tmp_path, "t", schedule="1f1b", m=2, scale_rows=True, gaps=None,
                          per_row=None))
    pred = predict(cal, "1f1b", 2)
    assert pred.latency_s == pytest.approx(0.05e-3, rel=1e-9)
    assert pred.step_s == pytest.approx(truth["step_s"], rel=1e-9)


def test_a_slow_step_does_not_bias_the_prediction(tmp_path):
    # one step of four runs 3x slower: the measured step time is the median, and so is the
    # prediction (a mean over actions predicted the slow step's share into every step)
    run = _run(tmp_path, "slow", schedule="gpipe", m=2, xfer=70 * US, slow={2: 3.0})
    me = measured(run)
    pred = predict(calibrate([run]), "gpipe", 2)
    assert pred.step_s == pytest.approx(me["step_s"], rel=1e-9)
    assert pred.spread[1] > pred.spread[0]        # the slow step shows in the spread


def test_continuous_steps_reproduce_their_own_step(tmp_path):
    run = _run(tmp_path, "c", schedule="1f1b", m=4, xfer=70 * US, continuous=True)
    pred = predict(calibrate([run]), "1f1b", 4)
    assert pred.step_s == pytest.approx(measured(run)["step_s"], rel=1e-9)


def test_another_world_size_composes_stages_from_their_blocks(tmp_path):
    # 2 ranks x 3 blocks -> 3 ranks x 2 blocks of the same 6-block model: each stage is the sum
    # of its blocks; opt shared out by parameters (equal per block: 0.6 ms of 3 blocks -> 0.4)
    from analysis.whatif import what_if
    kw = dict(xfer=70 * US, gaps=30 * US, layers_per_stage=3)
    cal_run = _run(tmp_path, "p2", schedule="gpipe", m=4, p=2, t_opt=6 * MS // 10, **kw)
    kw["layers_per_stage"] = 2
    truth = measured(_run(tmp_path, "p3", schedule="1f1b", m=4, p=3, t_opt=4 * MS // 10, **kw))
    _, pred = what_if([cal_run], ["ranks=3", "schedule=1f1b"])
    assert pred.split == [(0, 2), (2, 4), (4, 6)]
    assert pred.step_s == pytest.approx(truth["step_s"], rel=1e-9)
    assert any(a.startswith("optimizer step") for a in pred.assumed)
    # a synthetic run has no formula for another split's bytes: said, not guessed
    assert pred.peak_act_bytes == [None] * 3 and any("peak" in a for a in pred.assumed)


def test_a_pipeline_predicted_from_one_process(tmp_path):
    # one process ran the whole 4-block model: no message was measured, so the assumed
    # message time is said; with the truth's messages that long (a boundary of 64 floats per
    # row, 16 rows), the prediction is exact
    from analysis.predict.gaps import ASSUMED_MESSAGE
    from analysis.whatif import what_if
    one = _run(tmp_path, "one", schedule="naive", m=1, p=1, layers_per_stage=4, gaps=30 * US,
               t_opt=MS, block_times=True)
    xfer = round(1e9 * (ASSUMED_MESSAGE[0] + ASSUMED_MESSAGE[1] * 64 * 4 * 16))
    truth = measured(_run(tmp_path, "two", schedule="gpipe", m=4, p=2, layers_per_stage=2,
                          gaps=30 * US, t_opt=MS // 2, xfer=xfer))
    _, pred = what_if([one], ["ranks=2", "schedule=gpipe", "m=4"])
    assert pred.step_s == pytest.approx(truth["step_s"], rel=1e-6)
    assert any(a.startswith("messages: none measured") for a in pred.assumed)


# gaps that depend on what the executor just finished: after a compute action (it frees the
# graph) long, after a message call (a post returns at once) short, whatever comes next
COMPUTE = ("fwd", "bwd", "opt")
BY_CATEGORY = {(True, True): 40 * US, (True, False): 80 * US, (False, True): 20 * US,
               (False, False): 5 * US}


def _category_gaps(*schedules):
    out = {}
    for sch, m in schedules:
        for acts in S.build(sch, 2, m, False):
            for a, b in zip(acts, acts[1:]):
                out[a.kind, b.kind] = BY_CATEGORY[a.kind in COMPUTE, b.kind in COMPUTE]
    return out


@pytest.mark.parametrize("m", [4, 8])
def test_unmeasured_gaps_keep_the_category_of_the_transition(tmp_path, m):
    # 1F1B's posts and waits (irecv -> isend, isend -> wait, wait -> wait) and bwd -> fwd are
    # transitions a GPipe run never makes. Taken as the median gap into a send (which follows
    # a backward in GPipe: 80 µs here) or the rank's median, a 1F1B predicted from GPipe was
    # too long (measured on real runs: 1f1b-8's gaps summed 5.1 ms per step against 2.7 ms);
    # taken from the gaps between the same categories (message call -> message call: 5 µs,
    # compute -> compute: 40 µs) they are exact here
    gaps = _category_gaps(("gpipe", 2), ("1f1b", m))
    kw = dict(xfer=0, gaps=gaps, block_times=True)
    cal = calibrate([_run(tmp_path, "g2", schedule="gpipe", m=2, **kw)])
    truth = measured(_run(tmp_path, "t", schedule="1f1b", m=m, **kw))
    pred = predict(cal, "1f1b", m)
    assert pred.step_s == pytest.approx(truth["step_s"], rel=1e-9)
    assert pred.bubble == pytest.approx(truth["bubble"], abs=1e-9)
    assert any("message call into a message call" in a for a in pred.assumed)


def test_no_action_and_no_message_is_no_gap(tmp_path):
    # action_gaps on frames without rows: no row (once one made-up row of NaNs)
    run = _run(tmp_path, "g", schedule="gpipe", m=2, steps=3)
    table = schedule_table(S.build("gpipe", 2, 2))
    acts = action_times(run.events, [1], run.meta)
    assert len(action_gaps(run.events.iloc[:0], acts.iloc[:0], table)) == 0
    g = action_gaps(run.events[run.events["step"] == 1], acts, table)   # every action once
    assert len(g) == len(table) and g["prev"].eq("").sum() == 2      # one first action a rank
