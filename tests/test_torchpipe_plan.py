"""PyTorch's plan in our IR (harness/torchpipe/plan.py), for every class the instrument measures.

The real PyTorch classes are built for each rank in one process, on torch's fake process group
(no communication: building a schedule only plans), on stand-in stages. Their plan, converted,
must be well formed and deadlock-free in our simulator, compute what PyTorch's `pipeline_order`
says in its order, and compute what our schedule of the same name computes (an independent
check on both conversions: tests/test_schedule_peer.py compares our orders with PyTorch's
generators directly).

One known exception, pinned so that a fix upstream shows here: Schedule1F1B's
`_get_pipeline_order` (its order for drawing; the code that runs is right) numbers the last
rank's forwards 1..m instead of 0..m-1 (it starts counting at mb 0 and increments before its
first steady forward when the rank has no warm-up forward).
"""
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402

from benchmarks.schedules import V, usable  # noqa: E402
from harness import schedule as S  # noqa: E402
from harness.schedule import simulate  # noqa: E402
from harness.torchpipe import plan  # noqa: E402
from harness.torchpipe.build import PEER, torch_schedule  # noqa: E402

KIND = {"F": S.FWD, "B": S.BWD, "I": S.BWD_IN, "W": S.BWD_W}
GRID = [(n, p, m) for n in sorted(PEER) for p in (2, 3) for m in sorted({1, p, 2 * p})
        if usable(n, p, m) and (n == "naive") == (m == 1)]


class _Stage:
    """What torch_schedule reads of harness.core.stage.Stage: blocks, chunks, loss."""
    def __init__(self, chunks):
        self.chunks = chunks
        self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for b in chunks for _ in range(*b))
        self.loss = lambda out, y: out.sum()


def build(name, p, m):
    """PyTorch's schedule of every rank (fake process group) -> [(sched, blocks)] per rank."""
    pl = S.build(name, p, m, virtual=V.get(name, 1)).placement
    out = []
    for r in range(p):
        dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=p)
        try:
            st = _Stage([(pl.stage(r, c), pl.stage(r, c) + 1) for c in range(pl.v)])
            out.append(torch_schedule(name, st, pl, r, m))
        finally:
            dist.destroy_process_group()
    return out


def compute(acts, pl, r):
    return [(a.kind, a.mb, pl.stage(r, a.chunk)) for a in acts
            if a.kind in S.COMPUTE and a.kind != S.OPT]


def pytorch_order(sched, r):
    """(kind, mb, stage) of PyTorch's pipeline_order for rank r, sub-actions flattened."""
    return [(KIND[x.computation_type.value], x.microbatch_index, x.stage_index)
            for a in sched.pipeline_order[r] if a is not None
            for x in (a.sub_actions or (a,)) if x.computation_type.value in KIND]


@pytest.mark.parametrize("name,p,m", GRID, ids=[f"{n}-p{p}-m{m}" for n, p, m in GRID])
def test_the_plan_is_pytorchs_order_checked_and_ours(name, p, m):
    built = build(name, p, m)
    sched0 = built[0][0]
    mine = plan.from_torch(sched0, name)
    assert mine.name == name and mine.microbatches == m and mine.overlap
    simulate.check(mine)                     # well formed, every message matched, no deadlock
    ours = S.build(name, p, m, virtual=V.get(name, 1))
    assert mine.placement == ours.placement
    for r, (sched, _) in enumerate(built):
        got = compute(mine[r], mine.placement, r)
        if name == "1f1b" and r == p - 1:
            got_drawn = [(k, mb + (k == S.FWD), g) for k, mb, g in got]
            assert got_drawn == pytorch_order(sched, r), "PyTorch's drawing order changed"
        else:
            assert got == pytorch_order(sched, r), f"rank {r}"
        assert got == compute(ours[r], ours.placement, r), f"rank {r}"
        if r:   # every rank's schedule object plans the same for everyone
            assert plan.from_torch(sched, name) == mine


def test_single_stage_classes_post_and_wait_as_their_code_does():
    """GPipe: the receive posted and waited right before its compute, forward sends waited
    after the last forward; 1F1B on the first of 2 ranks, m=3: the held-back send posted with
    the next receive, both waited for, then the backward."""
    g = plan._gpipe(1, 2, 2)
    assert [repr(a) for a in g[:4]] == ["irecv_act0", "wait_recv_act0", "fwd0", "irecv_act1"]
    assert [repr(a) for a in plan._gpipe(0, 2, 2)[:5]] == [
        "fwd0", "isend_act0", "fwd1", "isend_act1", "wait_send_act0"]
    f = [repr(a) for a in plan._one_f_one_b(0, 2, 3)]
    assert f[:7] == ["fwd0", "isend_act0", "fwd1", "wait_send_act0", "isend_act1",
                     "irecv_grad0", "wait_send_act1"]
    assert f[7:9] == ["wait_recv_grad0", "bwd0"] and f[-1] == "opt"


def test_placement_is_loop_or_v_and_nothing_else():
    assert plan.placement({0: 0, 1: 1, 2: 0, 3: 1}, 2) == S.Placement(2, 2, "loop")
    assert plan.placement({0: 0, 1: 1, 2: 1, 3: 0}, 2) == S.Placement(2, 2, "v")
    with pytest.raises(ValueError, match="neither a loop nor a V"):
        plan.placement({0: 1, 1: 0}, 2)
