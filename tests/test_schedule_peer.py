"""Our virtual-stage and zero-bubble schedules against PyTorch's, action for action.

An independent second source for the schedules of harness/schedule/ (interleaved.py and
zero_bubble.py): the compute order that
torch.distributed.pipelining (torch pinned in pyproject.toml) builds for each rank. PyTorch's
classes need a process group and real stages to be constructed, so the test calls their order
generator (`_calculate_single_rank_operations`, then `_add_bubbles_to_actions` where the class
has one) on a stand-in holding the attributes it reads. Those are private: a torch upgrade that
renames them fails here loudly, which is the moment to look again. Communication is left out
(PyTorch inserts its own); what must match is which (kind, microbatch, global stage) each rank
computes, in which order.

Our 1f1b is not compared: PyTorch's Schedule1F1B builds no order list, and
ScheduleInterleaved1F1B with one stage per rank runs one more warm-up forward than 1F1B.
"""
from types import SimpleNamespace

import pytest

from harness import schedule as S

T = pytest.importorskip("torch.distributed.pipelining.schedules")
from benchmarks import torch_pipe  # noqa: E402  (after the skip: it imports the pipelining API)
from benchmarks.schedules import V, usable  # noqa: E402

KIND = {"FORWARD": S.FWD, "FULL_BACKWARD": S.BWD, "BACKWARD_INPUT": S.BWD_IN,
        "BACKWARD_WEIGHT": S.BWD_W}
# the classes benchmarks.schedules runs as our peers, with the chunks per rank it gives them
PEER = {name: (torch_pipe.PEER[name], V.get(name, 1)) for name in sorted(torch_pipe.MULTI)}


def theirs(cls, p: int, m: int, v: int) -> list[list[tuple]]:
    """PyTorch's compute order for each rank: (kind, microbatch, global stage)."""
    o = SimpleNamespace(n_local_stages=v, pp_group_size=p, _n_microbatches=m, num_stages=p * v,
                        _num_stages=p * v)
    o.number_of_rounds = max(1, m // p)                  # as the classes' __init__ sets them
    o.microbatches_per_round = m // o.number_of_rounds
    o.pipeline_order = {r: cls._calculate_single_rank_operations(o, r) for r in range(p)}
    order = (cls._add_bubbles_to_actions(o, p * v) if hasattr(cls, "_add_bubbles_to_actions")
             else o.pipeline_order)
    out = []
    for r in range(p):
        seq = []
        for a in filter(None, order[r]):
            for x in (a.sub_actions if a.computation_type.name == "OVERLAP_F_B" else (a,)):
                seq.append((KIND[x.computation_type.name], x.microbatch_index, x.stage_index))
        out.append(seq)
    return out


def ours(name: str, p: int, m: int, v: int) -> list[list[tuple]]:
    s = S.build(name, p, m, virtual=v)
    return [[(a.kind, a.mb, s.placement.stage(r, a.chunk)) for a in acts if a.kind in S.COMPUTE
             and a.kind != S.OPT] for r, acts in enumerate(s)]


GRID = [(name, p, m) for name in PEER for p in (2, 3, 4) for m in sorted({p, 2 * p, 8, 4 * p})
        if usable(name, p, m)]


@pytest.mark.parametrize("name,p,m", GRID, ids=[f"{n}-p{p}-m{m}" for n, p, m in GRID])
def test_compute_order_is_pytorchs(name, p, m):
    cls, v = PEER[name]
    want, got = theirs(cls, p, m, v), ours(name, p, m, v)
    for r in range(p):
        assert got[r] == want[r], f"rank {r}"
    fwds = sorted((mb, st) for seq in got for k, mb, st in seq if k == S.FWD)  # not two empties
    assert fwds == sorted((mb, st) for mb in range(m) for st in range(p * v))


def test_the_comparison_can_fail():
    """The stand-in really reproduces PyTorch's order: 1F1B through the interleaved class with
    one stage per rank is known to differ (one more warm-up forward on rank 0 at m=4)."""
    got, want = ours("1f1b", 2, 4, 1), theirs(T.ScheduleInterleaved1F1B, 2, 4, 1)
    assert got[0] != want[0]
    assert [k for k, *_ in want[0][:3]] == [S.FWD] * 3 and [k for k, *_ in got[0][:3]] != [S.FWD] * 3
