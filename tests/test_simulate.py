"""Simulator: every generated schedule checks and hits the closed-form bubble; broken ones fail."""
import pytest

from harness.schedule import Action, build
from harness.schedule.simulate import (DeadlockError, PlannedOp, ScheduleError, check, idle_share,
                              makespan, simulate, to_frame)

A = Action


def grid(ps=(1, 2, 3, 4), ms=(1, 2, 4, 8)):
    for name in ("naive", "gpipe", "1f1b"):  # one chunk per rank; the rest: test_schedule_zb.py
        for p in ps:
            for m in ((1,) if name == "naive" else ms):
                for ov in (False, True):
                    yield name, p, m, ov


@pytest.mark.parametrize("name,p,m,ov", list(grid()))
def test_generated_schedules_check(name, p, m, ov):
    check(build(name, p, m, ov))


def test_wider_grid_is_deadlock_free():
    """The brief's verification range, p in 1..6, m in 1..12, both variants."""
    for name, p, m, ov in grid(range(1, 7), range(1, 13)):
        check(build(name, p, m, ov))


def closed_makespan(name, p, m, f, b):
    """GPipe (Huang et al. 2019) and 1F1B (Narayanan et al. 2021): m+p-1 slots of f+b on the
    critical path; naive: p stages one after another, forward then backward."""
    return p * (f + b) if name == "naive" else (m + p - 1) * (f + b)


def closed_bubble(name, p, m):
    return (p - 1) / p if name == "naive" else (p - 1) / (m + p - 1)


@pytest.mark.parametrize("name,p,m,ov", list(grid()))
@pytest.mark.parametrize("f,b", [(1, 1), (1, 2)])
def test_makespan_and_bubble_match_closed_forms(name, p, m, ov, f, b):
    ops = simulate(build(name, p, m, ov), {"fwd": f, "bwd": b})
    assert makespan(ops) == pytest.approx(closed_makespan(name, p, m, f, b))
    assert idle_share(ops) == pytest.approx([closed_bubble(name, p, m)] * p)


def test_unit_costs_default_and_one_op_per_action():
    sched = build("1f1b", 3, 4)
    ops = simulate(sched)
    assert len(ops) == sum(map(len, sched))
    assert makespan(ops) == pytest.approx(closed_makespan("1f1b", 3, 4, 1, 2))
    for r in range(3):  # each rank runs its list in order, without overlap
        mine = [o for o in ops if o.rank == r]
        assert [A(o.kind, o.mb) for o in mine] == sched[r]
        assert all(x.end <= y.start + 1e-12 for x, y in zip(mine, mine[1:]))


def test_callable_durations_and_latency():
    """A slow last stage stretches every step; latency shows up once per boundary crossing."""
    sched = build("naive", 2, 1)
    ops = simulate(sched, lambda r, a: {"fwd": 1.0 + r, "bwd": 2.0}.get(a.kind, 0.0), latency=0.5)
    # fwd 1 (rank 0) + 0.5 + fwd 2 (rank 1) + bwd 2 + 0.5 + bwd 2 (rank 0)
    assert makespan(ops) == pytest.approx(8.0)
    recv = next(o for o in ops if o.kind == "recv_act")
    send = next(o for o in ops if o.kind == "send_act")
    assert recv.end == send.end == pytest.approx(1.5)  # rendezvous: both sides end together


def test_gap_delays_each_action_once_even_a_blocked_one():
    """A gap is the executor's own time before an action: a communication call is posted
    only after it, and a call that blocks pays it once, not again when it resumes."""
    sched = build("naive", 2, 1)
    gaps = {("fwd", "send_act"): 0.25, ("recv_act", "fwd"): 0.125}

    def gap(r, a, prev):
        return gaps.get((prev.kind, a.kind), 0.0) if prev else 0.0
    ops = simulate(sched, {"fwd": 1.0, "bwd": 2.0}, latency=0.5, gap=gap)
    send = next(o for o in ops if o.kind == "send_act")
    recv = next(o for o in ops if o.kind == "recv_act")
    assert send.start == pytest.approx(1.25) and recv.end == pytest.approx(1.75)
    fwd1 = next(o for o in ops if o.kind == "fwd" and o.rank == 1)
    assert fwd1.start == pytest.approx(1.875)      # once, after the receive that blocked
    # fwd 1 + gap .25 + message .5 + gap .125 + fwd 1 + bwd 2 + message .5 + bwd 2
    assert makespan(ops) == pytest.approx(7.375)
    with pytest.raises(ValueError, match="negative gap"):
        simulate(sched, gap=lambda r, a, prev: -1.0)


def test_a_send_can_complete_later_than_its_receive():
    """latency=(receiver's, sender's): under MPI a send completes when its receiver next makes
    progress, which on a loaded host is long after the receive; the sender waits that long."""
    sched = build("naive", 2, 1)
    ops = simulate(sched, {"fwd": 1.0, "bwd": 2.0}, latency=(0.5, 2.0))
    send = next(o for o in ops if o.kind == "send_act")
    recv = next(o for o in ops if o.kind == "recv_act")
    assert recv.end == pytest.approx(1.5) and send.end == pytest.approx(3.0)
    # rank 1: fwd 1.5-2.5, bwd -4.5, its send of the gradient until 6.5; rank 0 receives it
    # at 5.0 and ends its backward at 7.0
    assert makespan(ops) == pytest.approx(7.0)
    assert makespan(simulate(sched, {"fwd": 1.0, "bwd": 2.0}, latency=(0.5, 0.5))) == \
        pytest.approx(makespan(simulate(sched, {"fwd": 1.0, "bwd": 2.0}, latency=0.5)))


def test_overlap_hides_latency_in_gpipe():
    plain = makespan(simulate(build("gpipe", 4, 8), latency=0.5))
    ov = makespan(simulate(build("gpipe", 4, 8, overlap=True), latency=0.5))
    # only the 2·(p-1) boundary crossings of the critical path are left to pay
    assert ov == pytest.approx((8 + 3) * 3 + 2 * 3 * 0.5) and ov < plain


def test_durations_errors():
    with pytest.raises(ValueError, match="unknown kinds"):
        simulate(build("naive", 1, 1), {"fwd": 1, "bwd": 1, "fw": 2})
    with pytest.raises(ValueError, match="at least 'fwd' and 'bwd'"):
        simulate(build("naive", 1, 1), {"fwd": 1})


def test_to_frame():
    df = to_frame(simulate(build("gpipe", 2, 2)))
    assert list(df.columns) == ["rank", "kind", "mb", "start", "end", "chunk"]
    assert set(df["rank"]) == {0, 1} and (df["end"] >= df["start"]).all()


# --- broken schedules --------------------------------------------------------------------------

def two_rank(r0, r1):
    return [[A(k, i) for k, i in r0] + [A("opt")], [A(k, i) for k, i in r1] + [A("opt")]]


OK0 = [("fwd", 0), ("send_act", 0), ("recv_grad", 0), ("bwd", 0)]
OK1 = [("recv_act", 0), ("fwd", 0), ("bwd", 0), ("send_grad", 0)]


def test_two_rank_reference_is_valid():
    check(two_rank(OK0, OK1))


@pytest.mark.parametrize("r0,r1,match", [
    # rank 1 never receives the activation rank 0 sends
    (OK0, [("fwd", 0), ("bwd", 0), ("send_grad", 0)],
     r"rank 1: fwd0 runs before its activation arrived"),
    # a send with no receive: rank 0 sends activation 0 twice, rank 1 receives it once
    (OK0 + [("send_act", 0)], OK1,
     r"rank 0: send_act0 to rank 1 has no matching receive"),
    (OK0, [("recv_act", 0), ("recv_act", 0)] + OK1[1:],
     r"rank 1: recv_act0 from rank 0 has no matching send"),
    ([("bwd", 0), ("fwd", 0)], [("fwd", 0)], r"rank 0: bwd0 runs before fwd0"),
    ([("fwd", 0)] + OK0[2:], OK1, r"rank 1: recv_act0 from rank 0 has no matching send"),
    ([("fwd", 0), ("fwd", 1), ("send_act", 0), ("recv_grad", 0), ("bwd", 0)], OK1,
     r"rank 0: fwd1 has no bwd1"),
    (OK0, [("wait_recv_act", 0)] + OK1[1:],
     r"rank 1: wait_recv_act0 without a matching irecv_act0"),
    (OK0, [("irecv_act", 0)] + OK1[1:], r"rank 1: fwd0 runs before its activation arrived"),
    ([("fwd", 0), ("isend_act", 0)] + OK0[2:], OK1,
     r"rank 0: isend_act0 is never completed \(no wait_send_act0"),
    ([("send_grad", 0)] + OK0, OK1, r"rank 0: send_grad0 has peer rank -1, which does not exist"),
    (OK0, [("recv_act", 0), ("fwd", 0), ("send_grad", 0), ("bwd", 0)],
     r"rank 1: send_grad0 to rank 0 before bwd0 produced it"),
])
def test_broken_schedules_rejected(r0, r1, match):
    with pytest.raises(ScheduleError, match=match):
        check(two_rank(r0, r1))
    with pytest.raises(ScheduleError, match=match):
        simulate(two_rank(r0, r1))


def test_missing_and_duplicated_opt():
    good = two_rank(OK0, OK1)
    with pytest.raises(ScheduleError, match="rank 1: has 0 opt actions"):
        check([good[0], good[1][:-1]])
    with pytest.raises(ScheduleError, match="rank 0: has 2 opt actions"):
        check([good[0] + [A("opt")], good[1]])
    with pytest.raises(ScheduleError, match=r"rank 0: fwd0 comes after opt"):
        check([[A("opt"), A("fwd", 0), A("bwd", 0)]])


def test_head_to_head_blocking_sends_deadlock():
    """Both ranks send first: rendezvous Send blocks on each side, MPI hangs, and so do we."""
    r0 = [("fwd", 0), ("send_act", 0), ("fwd", 1), ("send_act", 1),
          ("recv_grad", 0), ("bwd", 0), ("recv_grad", 1), ("bwd", 1)]
    gpipe_r1 = [("recv_act", 0), ("fwd", 0), ("recv_act", 1), ("fwd", 1),
                ("bwd", 0), ("send_grad", 0), ("bwd", 1), ("send_grad", 1)]
    check(two_rank(r0, gpipe_r1))
    # rank 1 now sends gradient 0 before receiving activation 1, while rank 0 sends activation 1
    r1 = [("recv_act", 0), ("fwd", 0), ("bwd", 0), ("send_grad", 0),
          ("recv_act", 1), ("fwd", 1), ("bwd", 1), ("send_grad", 1)]
    with pytest.raises(DeadlockError) as e:
        check(two_rank(r0, r1))
    msg = str(e.value)
    assert "rank 0 blocked at send_act1 (action 3), waiting for rank 1" in msg
    assert "rank 1 blocked at send_grad0 (action 3), waiting for rank 0" in msg


def test_1f1b_steady_state_with_blocking_sends_deadlocks():
    """1F1B written naively with blocking Send/Recv (send first, then receive) hangs in the
    steady state; the fused exchange of Megatron-LM is what makes it run."""
    fused = build("1f1b", 2, 4)
    naive_comm = []
    for acts in fused:
        out, skip = [], {"irecv_grad", "irecv_act", "wait_send_act", "wait_send_grad"}
        for a in acts:
            kind = {"isend_act": "send_act", "isend_grad": "send_grad", "wait_recv_grad":
                    "recv_grad", "wait_recv_act": "recv_act"}.get(a.kind, a.kind)
            if a.kind not in skip:
                out.append(A(kind, a.mb))
        naive_comm.append(out)
    with pytest.raises(DeadlockError, match=r"rank 0 blocked at send_act1 .*rank 1 blocked at "
                                            r"send_grad0"):
        check(naive_comm)
    check(fused)


def test_planned_op_is_frozen():
    op = PlannedOp(0, "fwd", 0, 0.0, 1.0)
    with pytest.raises(Exception):
        op.start = 2.0


def test_eager_sends_never_wait_for_their_receiver():
    """GPipe p=2 m=2, latency 0.5, rank 0's fwd 1, rank 1's fwd 3. Rank 0: fwd0 [0,1], send0
    [1,1.5], fwd1 [1.5,2.5], send1 posted at 2.5. Rank 1: recv0 ends 1.5, fwd0 [1.5,4.5], posts
    recv1 at 4.5. Rendezvous: send1 waits for that post, ends 5.0. Eager: send1 ends at its post
    + latency, 3.0; the receive still ends at max(posts) + latency = 5.0."""
    sched = build("gpipe", 2, 2)

    def cost(r, a):
        return {"fwd": 1.0 if r == 0 else 3.0, "bwd": 2.0}.get(a.kind, 0.0)
    ren = simulate(sched, cost, latency=0.5)
    eag = simulate(sched, cost, latency=0.5, protocol="eager")

    def op(ops, r, kind):
        return next(o for o in ops if o.rank == r and o.kind == kind and o.mb == 1)
    assert (op(eag, 0, "send_act").start, op(eag, 0, "send_act").end) == (2.5, 3.0)
    assert op(ren, 0, "send_act").end == 5.0
    assert op(eag, 1, "recv_act").end == op(ren, 1, "recv_act").end == 5.0
    with pytest.raises(ValueError, match="protocol"):
        simulate(sched, protocol="magic")
