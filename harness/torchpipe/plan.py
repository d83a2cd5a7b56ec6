"""PyTorch's plan of one step, in our schedule IR: the schedule.json of a run of
torch.distributed.pipelining, which the analysis draws as the planned timeline and checks.

PyTorch's runtime classes (`ScheduleInterleaved1F1B`, `ScheduleInterleavedZeroBubble`,
`ScheduleZBVZeroBubble`, `ScheduleDualPipeV`) run a lowered plan, `pipeline_order_with_comms`:
per rank, its `_Action`s with the sends and receives PyTorch's `_add_send_recv` placed. Each
becomes ours one for one: `SEND_F` an `isend_act` (every PyTorch send is non-blocking), `RECV_F`
an `irecv_act` (posted), a forward whose input comes from another rank a `wait_recv_act` then
the `fwd` (the runtime waits for the posted receive right before the compute), `B`/`I` likewise
with `wait_recv_grad`; `OVERLAP_F_B` (DualPipeV) its sub-actions in order, as the runtime runs
them. The sends are waited for at the end of the step, last posted first; then `opt`. `UNSHARD`
and `RESHARD` (FSDP) do nothing without FSDP and `REDUCE_GRAD` (the gradients ÷ m) is not an
action of ours: the probe traces it as an `opt` span.

`ScheduleGPipe` and `Schedule1F1B` lower nothing: their `pipeline_order` is a compute order for
drawing, and their `_step_microbatches` issues the communication in code. `_gpipe` and
`_one_f_one_b` write that code's order of posts and waits down as actions (receives posted and
waited right before their compute, 1F1B's fused send+receive batches), over the same compute
order (tests/test_torchpipe_plan.py checks it is `pipeline_order`'s).
"""
from __future__ import annotations

from .. import schedule as S
from ..schedule import Action, Placement, Schedule

KIND = {"F": S.FWD, "B": S.BWD, "I": S.BWD_IN, "W": S.BWD_W}
COMM = {"SEND_F": S.ISEND_ACT, "RECV_F": S.IRECV_ACT, "SEND_B": S.ISEND_GRAD,
        "RECV_B": S.IRECV_GRAD}


def placement(stage_to_rank: dict, p: int) -> Placement:
    """Our Placement of PyTorch's stage -> rank map (loop, or V for ZB-V and DualPipeV)."""
    n = len(stage_to_rank)
    for style in ("loop", "v"):
        pl = Placement(p, max(1, n // p), style)
        if pl.stages == n and all(pl.where(s)[0] == r for s, r in stage_to_rank.items()):
            return pl
    raise ValueError(f"stage -> rank {stage_to_rank}: neither a loop nor a V placement")


def stages_of(sched) -> list:
    """The schedule's stages on this rank (single-stage classes hold one)."""
    return list(sched._stages) if hasattr(sched, "_stages") else [sched._stage]


def from_torch(sched, name: str | None = None) -> Schedule:
    """The plan of PyTorch schedule `sched` (built on this rank) for every rank, as a Schedule
    named `name` (ours, e.g. "1f1b": the theory the analysis compares against)."""
    st = stages_of(sched)[0]
    p, m = st.group_size, sched._n_microbatches
    pl = placement(st.stage_index_to_group_rank, p)   # the schedule set it on every stage
    if hasattr(sched, "pipeline_order_with_comms"):
        order = sched.pipeline_order_with_comms
        ranks = [_runtime_rank(order[r], r, pl) for r in range(p)]
    else:
        make = _gpipe if type(sched).__name__ == "ScheduleGPipe" else _one_f_one_b
        ranks = [make(r, p, m) for r in range(p)]
    return Schedule(ranks, pl, name, m, True)


def _runtime_rank(actions: list, r: int, pl: Placement) -> list:
    out, sent = [], []
    for a in actions:
        if a is None:
            continue
        for x in (a.sub_actions if a.computation_type.value == "OVERLAP_F_B" else (a,)):
            t, g, mb = x.computation_type.value, x.stage_index, x.microbatch_index
            chunk = pl.where(g)[1]
            if t in COMM:
                out.append(Action(COMM[t], mb, chunk))
                if t.startswith("SEND"):
                    sent.append(out[-1])
            elif t in KIND:
                if t == "F" and g > 0 and pl.where(g - 1)[0] != r:
                    out.append(Action(S.WAIT_RECV_ACT, mb, chunk))
                elif t in ("B", "I") and g < pl.stages - 1 and pl.where(g + 1)[0] != r:
                    out.append(Action(S.WAIT_RECV_GRAD, mb, chunk))
                out.append(Action(KIND[t], mb, chunk))
    # the runtime waits for its sends after the last action, popping the last posted first
    out += [Action(S.KIND_OF[S.COMM[a.kind][0], "wait_send"], a.mb, a.chunk)
            for a in reversed(sent)]
    return out + [Action(S.OPT)]


def _post(stream: str, role: str, mb: int, skip: bool) -> list:
    """[the irecv/isend of `stream` for microbatch mb], or [] at a pipeline end."""
    return [] if skip else [Action(S.KIND_OF[stream, role], mb)]


def _waits(posted: list) -> list:
    """Waits for posted operations, in the order PyTorch's `_wait_batch_p2p` waits for them."""
    return [Action(S.KIND_OF[S.COMM[a.kind][0], "wait_" + S.COMM[a.kind][1][1:]], a.mb)
            for a in posted]


def _gpipe(r: int, p: int, m: int) -> list:
    """ScheduleGPipe._step_microbatches: per forward, its receive posted and waited, the
    forward, its send posted; the forward sends waited after the last forward; the same for
    the backwards, their sends waited at the end."""
    first, last = r == 0, r == p - 1
    acts = []
    for stream, comp, up, down in (("act", S.FWD, first, last), ("grad", S.BWD, last, first)):
        sent = []
        for i in range(m):
            rv, sd = _post(stream, "irecv", i, up), _post(stream, "isend", i, down)
            acts += rv + _waits(rv) + [Action(comp, i)] + sd
            sent += sd
        acts += _waits(sent)
    return acts + [Action(S.OPT)]


def _one_f_one_b(r: int, p: int, m: int) -> list:
    """Schedule1F1B._step_microbatches: min(m, p - r) warm-up forwards (each send waited for
    after the next forward, the last one held back), then backward and forward alternate, each
    preceded by one batch that posts the held-back send with the next receive and waits for
    both; cool-down backwards with their receives, each send waited for after the next
    backward."""
    first, last = r == 0, r == p - 1
    acts, f, b, pending, held = [], 0, 0, [], []
    warm = min(m, p - r)
    for _ in range(warm):
        rv = _post("act", "irecv", f, first)
        acts += rv + _waits(rv) + [Action(S.FWD, f)] + _waits(pending)
        sends, pending = _post("act", "isend", f, last), []
        if f != warm - 1:
            acts += sends
            pending = sends
        else:
            held = sends
        f += 1
    while True:
        batch = held + _post("grad", "irecv", b, last)
        acts += batch + _waits(batch) + [Action(S.BWD, b)]
        held = _post("grad", "isend", b, first)
        b += 1
        if f == m:
            break
        batch = held + _post("act", "irecv", f, first)
        acts += batch + _waits(batch) + [Action(S.FWD, f)]
        held = _post("act", "isend", f, last)
        f += 1
    acts += held
    pending = held
    while b < m:
        rv = _post("grad", "irecv", b, last)
        acts += rv + _waits(rv) + [Action(S.BWD, b)] + _waits(pending)
        pending = _post("grad", "isend", b, first)
        acts += pending
        b += 1
    return acts + _waits(pending) + [Action(S.OPT)]
