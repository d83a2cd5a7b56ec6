"""Schedule generators: structure, in-flight bounds, theory numbers, overlap rewrite, JSON."""
from collections import Counter

import pytest

from harness.schedule import (BWD, COMM, COMPUTE, FWD, KINDS, OPT, Action, build,
                              from_json, gpipe, in_flight, naive, one_f_one_b, peer, theory,
                              to_json)

PS, MS = (1, 2, 3, 4), (1, 2, 4, 8)


def cases(overlaps=(False, True)):
    """(name, p, m, overlap) for every schedule in the tested grid."""
    for name in ("naive", "gpipe", "1f1b"):  # one chunk per rank; the rest: test_schedule_zb.py
        for p in PS:
            for m in ((1,) if name == "naive" else MS):
                for ov in overlaps:
                    yield name, p, m, ov


def closed_peak(name, p, m):
    """Peak microbatches in flight per stage: GPipe holds all m; 1F1B at most p-s (Narayanan et
    al. 2021); naive the single batch."""
    return {"naive": [1] * p, "gpipe": [m] * p,
            "1f1b": [min(m, p - s) for s in range(p)]}[name]


@pytest.mark.parametrize("name,p,m,ov", list(cases()))
def test_structure(name, p, m, ov):
    sched = build(name, p, m, ov)
    assert len(sched) == p
    for s, acts in enumerate(sched):
        assert [a.kind for a in acts].count(OPT) == 1 and acts[-1].kind == OPT
        # each microbatch exactly one fwd and one bwd, and the bwd after the fwd
        fwds = [a.mb for a in acts if a.kind == FWD]
        bwds = [a.mb for a in acts if a.kind == BWD]
        assert sorted(fwds) == sorted(bwds) == list(range(m))
        for i in range(m):
            assert acts.index(Action(FWD, i)) < acts.index(Action(BWD, i))
        # no communication past the pipeline ends
        for a in acts:
            if a.kind in COMM:
                assert 0 <= peer(a.kind, s) < p, (s, a)


@pytest.mark.parametrize("name,p,m,ov", list(cases()))
def test_every_send_has_its_receive(name, p, m, ov):
    sends, recvs = Counter(), Counter()
    for s, acts in enumerate(build(name, p, m, ov)):
        for a in acts:
            if a.kind not in COMM or COMM[a.kind][1].startswith("wait"):
                continue
            stream, role = COMM[a.kind]
            q = peer(a.kind, s)
            if "send" in role:
                sends[stream, a.mb, s, q] += 1
            else:
                recvs[stream, a.mb, q, s] += 1
    assert sends == recvs
    assert sum(sends.values()) == theory(name, p, m)["messages"] == 2 * (p - 1) * m


@pytest.mark.parametrize("name,p,m,ov", list(cases()))
def test_peak_in_flight_matches_closed_form(name, p, m, ov):
    sched = build(name, p, m, ov)
    assert [max(in_flight(acts)) for acts in sched] == closed_peak(name, p, m)
    assert theory(name, p, m)["peak_in_flight"] == closed_peak(name, p, m)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("m", MS)
def test_1f1b_shape(p, m):
    """Warm-up of min(p-s-1, m) forwards, then strict fwd/bwd alternation, then cool-down."""
    for s, acts in enumerate(one_f_one_b(p, m)):
        order = "".join("F" if a.kind == FWD else "B" for a in acts if a.kind in (FWD, BWD))
        w = min(p - s - 1, m)
        assert order == "F" * w + "FB" * (m - w) + "B" * w


def test_gpipe_backward_order_is_0_to_m_minus_1():
    for acts in gpipe(3, 4):
        assert [a.mb for a in acts if a.kind == BWD] == [0, 1, 2, 3]


def test_theory_bubble():
    assert theory("naive", 4, 1)["bubble"] == pytest.approx(3 / 4)
    for name in ("gpipe", "1f1b"):
        assert theory(name, 4, 8)["bubble"] == pytest.approx(3 / 11)
        assert theory(name, 1, 8)["bubble"] == 0


@pytest.mark.parametrize("name,p,m,_", list(cases((False,))))
def test_overlap_keeps_compute_order_and_never_blocks_on_sends(name, p, m, _):
    plain, ov = build(name, p, m), build(name, p, m, overlap=True)
    for s in range(p):
        assert [a for a in plain[s] if a.kind in COMPUTE] == [a for a in ov[s] if a.kind in COMPUTE]
        kinds = [a.kind for a in ov[s]]
        assert not {"send_act", "send_grad", "recv_act", "recv_grad"} & set(kinds)
        # every wait_send sits after the last compute but opt; every receive wait right before use
        last = max(k for k, a in enumerate(ov[s]) if a.kind in (FWD, BWD))
        assert all(k > last for k, a in enumerate(ov[s]) if a.kind.startswith("wait_send"))
        for k, a in enumerate(ov[s]):
            if a.kind.startswith("wait_recv"):
                nxt = next(b for b in ov[s][k + 1:] if b.kind in COMPUTE)
                assert nxt == Action(FWD if a.kind == "wait_recv_act" else BWD, a.mb)


def test_overlap_posts_next_receive_after_previous_wait():
    """One pre-posted receive per stream: irecv of mb k+1 right after the wait of mb k."""
    acts = build("gpipe", 3, 4, overlap=True)[1]
    assert acts[:2] == [Action("irecv_act", 0), Action("irecv_grad", 0)]
    k = acts.index(Action("wait_recv_act", 1))
    assert acts[k + 1] == Action("irecv_act", 2)
    for a in acts:  # each posted receive waited exactly once
        if a.kind.startswith("irecv"):
            assert acts.count(Action("wait_recv" + a.kind[5:], a.mb)) == 1


@pytest.mark.parametrize("args,match", [
    (("naive", 2, 4), "pipeline.microbatches=4.*only allowed value is 1"),
    (("gpipe", 2, 0), "pipeline.microbatches=0"),
    (("1f1b", 2, -1), "pipeline.microbatches=-1"),
    (("gpipe", 0, 2), "world size 0"),
    (("zb", 2, 2), r"schedule='zb': allowed naive, gpipe, 1f1b"),
])
def test_build_errors(args, match):
    with pytest.raises(ValueError, match=match):
        build(*args)


def test_naive_is_one_microbatch():
    assert naive(3) == naive(3, 1) == build("naive", 3, 1)


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="unknown action kind 'fwdd'"):
        Action("fwdd", 0)
    assert len(set(KINDS)) == len(KINDS) == 17   # + bwd_in, bwd_w (split backward)


@pytest.mark.parametrize("name,p,m,ov", [("1f1b", 3, 4, True), ("gpipe", 2, 2, False),
                                         ("naive", 1, 1, False)])
def test_json_round_trip(name, p, m, ov):
    import json
    sched = build(name, p, m, ov)
    obj = json.loads(json.dumps(to_json(sched, name, m, ov)))
    assert obj["name"] == name and obj["stages"] == p and obj["microbatches"] == m
    assert obj["overlap"] is ov
    assert from_json(obj) == sched


@pytest.mark.parametrize("name,p,m,ov", [("gpipe", 3, 2, False), ("1f1b", 4, 5, True)])
def test_both_sides_of_every_message_agree_on_tag_and_pair(name, p, m, ov):
    """schedule.message is the one place peer, tag and pair id come from: the sender's and the
    receiver's views of each message must coincide (and tags differ by stream)."""
    from harness.schedule import message, sending
    seen = {}
    for r, acts in enumerate(build(name, p, m, ov)):
        for a in acts:
            if a.kind in COMM and not COMM[a.kind][1].startswith("wait"):
                q, tag, pair = message(a.kind, r, 7, a.mb)
                src, dst = (r, q) if sending(a.kind) else (q, r)
                seen.setdefault(pair, set()).add((src, dst, tag))
                assert pair == f"{'A' if COMM[a.kind][0] == 'act' else 'G'}7.{a.mb}.{src}>{dst}"
                assert tag == 2 * a.mb + (COMM[a.kind][0] == "grad")
    assert seen and all(len(v) == 1 for v in seen.values())
