"""Virtual stages and split backward in the IR: interleaved 1F1B, ZB-H1, ZB-V and DualPipeV as
data, checked by the simulator, with in-flight peaks and bubbles against their closed forms."""
import pytest

from harness import runformat
from harness import schedule as S
from harness.schedule import (BWD, BWD_IN, BWD_W, FWD, OPT, Action, Placement, build, from_json,
                              in_flight, message, to_json)
from harness.schedule.registry import REGISTRY
from harness.schedule.simulate import DeadlockError, ScheduleError, check, idle_share, simulate

NEW = [("interleaved", 2), ("interleaved", 3), ("zb_h1", 1), ("zbv", 2)]
GRID = [(n, v, p, m) for n, v in NEW for p in (2, 3, 4) for m in (p, 2 * p)]
GRID += [("dualpipev", 2, p, m) for p in (2, 3, 4) for m in (2 * p, 3 * p)]  # needs m >= 2p
IDS = [f"{n}-v{v}-p{p}-m{m}" for n, v, p, m in GRID]


@pytest.mark.parametrize("name,v,p,m", GRID, ids=IDS)
def test_deadlock_free_and_complete(name, v, p, m):
    sched = build(name, p, m, virtual=v)
    check(sched)                                    # rendezvous sends: no deadlock
    for r, acts in enumerate(sched):
        assert acts[-1] == Action(OPT)
        for c in range(v):                          # every chunk: m forwards, m backwards
            fw = [a.mb for a in acts if a.kind == FWD and a.chunk == c]
            assert sorted(fw) == list(range(m))
            done = [a.mb for a in acts if a.kind in (BWD, BWD_W) and a.chunk == c]
            assert sorted(done) == list(range(m))


@pytest.mark.parametrize("name,v,p,m", GRID, ids=IDS)
def test_peak_in_flight_equals_closed_form(name, v, p, m):
    sched = build(name, p, m, virtual=v)
    assert [max(in_flight(a)) for a in sched] == REGISTRY[name].peak(p, m, v)


def test_closed_forms_by_hand():
    # Megatron's warm-up (p-r-1)*2 + (v-1)*p, +1 for the steady forward, capped at m*v
    assert REGISTRY["interleaved"].peak(4, 8, 2) == [11, 9, 7, 5]
    assert REGISTRY["zb_h1"].peak(4, 8) == [4, 4, 4, 4]          # 1F1B's stage-0 peak, everywhere
    assert REGISTRY["zbv"].peak(4, 8, 2) == [8, 8, 8, 8]         # 2p chunk-microbatches
    # DualPipeV's table (deepseek-ai/DualPipe): "PP+1" activations per device, PP = 2p stages
    assert REGISTRY["dualpipev"].peak(4, 8, 2) == [9, 9, 9, 9]


@pytest.mark.parametrize("p", (2, 3, 4))
@pytest.mark.parametrize("k", (1, 2, 4))
@pytest.mark.parametrize("times", [dict(fwd=1, bwd_in=1, bwd_w=1), dict(fwd=1, bwd_in=1.2, bwd_w=0.8),
                                   dict(fwd=1.5, bwd_in=1.5, bwd_w=1.0)])
def test_simulated_bubble_matches_theory(p, k, times):
    m = k * p
    full = {"fwd": times["fwd"], "bwd": times["bwd_in"] + times["bwd_w"], **times}
    for name, v in (("interleaved", 2), ("interleaved", 3), ("zb_h1", 1)):
        got = idle_share(simulate(build(name, p, m, virtual=v), full))
        assert got == pytest.approx([REGISTRY[name].bubble(p, m, v, times)] * p), name
    # 1F1B with the same times: ZB-H1 beats it by the Ws moved into the cool-down
    assert REGISTRY["zb_h1"].bubble(p, m, 1, times) < S.bubble("1f1b", p, m)


@pytest.mark.parametrize("name", ("zbv", "dualpipev"))
@pytest.mark.parametrize("p", (2, 3, 4))
@pytest.mark.parametrize("k", (2, 4))
def test_v_shaped_bubbles_with_equal_times(name, p, k):
    m = k * p
    got = idle_share(simulate(build(name, p, m, virtual=2)))
    assert got == pytest.approx([REGISTRY[name].bubble(p, m, 2)] * p)
    # by hand: (p-1) forward-times idle against 2 chunks x m x (f + b + w) of work
    assert got[0] == pytest.approx((p - 1) / ((p - 1) + 6 * m))


def test_zbv_bubble_below_a_full_v():
    # below m = 2p-1 the V is not full: the idle grows by 2 forward-times per missing microbatch
    for p in (2, 3, 4):
        for m in (1, 2, 3, 5):
            got = idle_share(simulate(build("zbv", p, m, virtual=2)))
            idle = max(p - 1, 2 * (2 * p - 1 - m))      # forward-times; busy is 6m of them
            assert got == pytest.approx([idle / (idle + 6 * m)] * p), (p, m)
            assert got == pytest.approx([REGISTRY["zbv"].bubble(p, m, 2)] * p), (p, m)


def test_dualpipev_mixes_full_and_split_backwards_and_loses_no_weight_gradient():
    sched = build("dualpipev", 3, 6, virtual=2)
    for acts in sched:
        kinds = {a.kind for a in acts}
        assert {BWD, BWD_IN, BWD_W} <= kinds
        for c in (0, 1):   # every split B has its W later, on the same chunk and microbatch
            ins = [a.mb for a in acts if a.kind == BWD_IN and a.chunk == c]
            ws = [a.mb for a in acts if a.kind == BWD_W and a.chunk == c]
            assert sorted(ins) == sorted(ws)
            for mb in ins:
                assert acts.index(Action(BWD_IN, mb, c)) < acts.index(Action(BWD_W, mb, c))


def test_interleaving_shrinks_the_bubble_by_v():
    p, m = 4, 8
    one = idle_share(simulate(build("1f1b", p, m)))[0]
    two = idle_share(simulate(build("interleaved", p, m, virtual=2)))[0]
    # bubble/compute (p-1)/m -> (1/v)(p-1)/m
    assert one / (1 - one) == pytest.approx((p - 1) / m)
    assert two / (1 - two) == pytest.approx((p - 1) / m / 2)


def test_placements():
    loop, vee = Placement(3, 2), Placement(3, 2, "v")
    assert [loop.stage(r, c) for c in (0, 1) for r in range(3)] == [0, 1, 2, 3, 4, 5]
    assert [vee.stage(r, 1) for r in range(3)] == [5, 4, 3]
    assert all(vee.where(vee.stage(r, c)) == (r, c) for r in range(3) for c in (0, 1))
    # interleaved wraps: rank 2 chunk 0 (stage 2) sends to rank 0 chunk 1 (stage 3)
    assert loop.neighbour(S.SEND_ACT, 2, 0)[:2] == (0, 1)
    # ZB-V's gradient from rank 1 chunk 1 (stage 4) goes down to rank 2 chunk 1 (stage 3)
    assert vee.neighbour(S.SEND_GRAD, 1, 1)[:2] == (2, 1)


def test_zbv_turn_moves_no_message():
    sched = build("zbv", 3, 6, virtual=2)
    last = sched[2]                     # holds stages 2 and 3: the activation turns locally
    assert not any(a.kind in S.COMM and S.placement_of(sched).neighbour(a.kind, 2, a.chunk)[0] == 2
                   for a in last)
    assert S.theory("zbv", 3, 6, 2)["messages"] == 2 * 4 * 6   # 5 boundaries, 1 on a rank


def test_tags_and_pair_ids_include_the_chunk():
    assert runformat.tag("act", 3) == 6 and runformat.tag("grad", 3, 0) == 7   # unchanged
    assert runformat.pair_id("act", 1, 2, 0, 1) == "A1.2.0>1"
    pl = Placement(2, 2)
    seen = set()
    for r in range(2):
        for c in range(2):
            for kind in (S.SEND_ACT, S.SEND_GRAD):
                g = pl.stage(r, c)
                if (kind == S.SEND_ACT and g == 3) or (kind == S.SEND_GRAD and g == 0):
                    continue
                q, tag, pair = message(kind, r, 0, 1, c, pl)
                # the receiving side computes the same tag and pair id
                qc = pl.neighbour(kind, r, c)[1]
                recv = S.RECV_ACT if kind == S.SEND_ACT else S.RECV_GRAD
                assert message(recv, q, 0, 1, qc, pl)[1:] == (tag, pair)
                seen.add((r, q, tag))
    assert len(seen) == 6                           # 6 distinct messages, none shares a tag
    with pytest.raises(ValueError, match="out of range"):
        runformat.tag("act", 2048)


def test_compact_names_round_trip():
    for a in (Action(FWD, 3, 1), Action(BWD_IN, 2, 0), Action(BWD_W, 1, 1), Action(BWD, 0),
              Action(S.ISEND_ACT, 2, 1), Action(OPT)):
        assert Action.parse(a.name) == a
    assert [Action(FWD, 3).name, Action(BWD_IN, 2, 1).name, Action(BWD_W, 0).name] == \
        ["0F3", "1I2", "0W0"]
    assert repr(Action(FWD, 3)) == "fwd3" and repr(Action(FWD, 3, 1)) == "fwd3@1"


def test_json_round_trip_keeps_chunks_and_placement():
    sched = build("zbv", 2, 4, virtual=2)
    back = from_json(to_json(sched, "zbv", 4, False))
    assert back == sched and back.placement == sched.placement
    old = {"name": "gpipe", "stages": 2, "microbatches": 1, "overlap": False,   # before chunks
           "actions": [[["fwd", 0], ["send_act", 0], ["recv_grad", 0], ["bwd", 0], ["opt", -1]],
                       [["recv_act", 0], ["fwd", 0], ["bwd", 0], ["send_grad", 0], ["opt", -1]]]}
    check(from_json(old))
    assert to_json(build("1f1b", 2, 2), "1f1b", 2, False)["actions"][0][0] == ["fwd", 0]


def test_checker_catches_split_backward_mistakes():
    ok = [[Action(FWD, 0), Action(BWD_IN, 0), Action(BWD_W, 0), Action(OPT)]]
    check(ok)
    with pytest.raises(ScheduleError, match="before bwd_in0"):
        check([[Action(FWD, 0), Action(BWD_W, 0), Action(BWD_IN, 0), Action(OPT)]])
    with pytest.raises(ScheduleError, match="bwd_w0"):
        check([[Action(FWD, 0), Action(BWD_IN, 0), Action(OPT)]])


def test_wrong_chunk_order_deadlocks():
    # rank 1 waits for chunk 1's activation before sending chunk 0's: rank 0 needs the latter
    sched = build("interleaved", 2, 2, virtual=2)
    bad = S.Schedule([list(a) for a in sched], sched.placement)
    r1 = bad[1]
    i = next(k for k, a in enumerate(r1) if a.kind == FWD)
    r1.insert(i, Action(S.RECV_GRAD, 1, 1))
    with pytest.raises((DeadlockError, ScheduleError)):
        check(bad)


def test_requirements_are_explained():
    with pytest.raises(ValueError, match="multiple of the 2 ranks"):
        build("interleaved", 2, 3, virtual=2)
    with pytest.raises(ValueError, match="pipeline.virtual >= 2"):
        build("interleaved", 2, 2, virtual=1)
    with pytest.raises(ValueError, match="pipeline.virtual=2"):
        build("zbv", 2, 2, virtual=3)
    with pytest.raises(ValueError, match="one chunk per rank"):
        build("1f1b", 2, 2, virtual=2)
    with pytest.raises(ValueError, match="needs at least 2p = 4 microbatches"):
        build("dualpipev", 2, 3, virtual=2)
