"""Lowering: a compute order per rank becomes a schedule with its communication.

Every generator (classic.py, interleaved.py, zero_bubble.py) writes only what its paper
specifies, the order of each rank's compute actions; `lower` adds the sends and receives its
placement implies (as torch.distributed.pipelining's `_add_send_recv` does), and `opt` at the
end. Three ways to communicate:

- blocking (GPipe, naive): receive right before the compute that needs the tensor, send right
  after the compute that made it, with MPI Send/Recv;
- blocking with exchanges (1F1B): where the generator says so, the send after one compute and
  the receive before the next, when both go to the same neighbour, are posted together and then
  both waited for (Megatron-LM's `send_forward_recv_backward`), since in 1F1B's steady state two
  neighbours each have something for the other at the same moment and two rendezvous sends would
  deadlock;
- overlapped (`overlapped`, every schedule with pipeline.overlap and all the zero-bubble and
  virtual-stage ones): non-blocking, receives posted early.
"""
from __future__ import annotations

from .ir import (COMM, COMPUTE, FWD, INPUT_GRAD, KIND_OF, OPT, RECV_ACT, RECV_GRAD, SEND_ACT,
                 SEND_GRAD, Action, Placement, Schedule, placement_of)


def lower(orders: list, pl: Placement, overlap: bool = False, exchange=None) -> Schedule:
    """Per rank, its compute order with the communication `pl` implies, then `opt`.

    orders[r]: rank r's compute actions (fwd, bwd, bwd_in, bwd_w) in order. A boundary between
    two stages of one rank (ZB-V's turn) moves no message. overlap: rewrite it non-blocking
    (`overlapped`). exchange[r]: indices k of orders[r] where the send after compute k and the
    receive before compute k+1 form one exchange (blocking only)."""
    out = []
    for r, order in enumerate(orders):
        pairs = exchange[r] if exchange else ()
        acts = []
        for k, a in enumerate(order):
            before, after = _comm(a, r, pl)
            if k - 1 in pairs and before and acts and _pairs(acts[-1], before[0], r, pl):
                acts[-1:] = _exchanged(acts[-1], before[0])
            else:
                acts += before
            acts += [a] + after
        out.append(acts + [Action(OPT)])
    sched = Schedule(out, pl)
    return overlapped(sched) if overlap else sched


def _comm(a: Action, r: int, pl: Placement) -> tuple[list, list]:
    """(receives before, sends after) compute `a` on rank r: a forward receives its activation
    and sends its output downstream, an input gradient comes from downstream and goes upstream,
    each only across a boundary to another rank."""
    if a.kind not in (FWD, *INPUT_GRAD):
        return [], []
    g = pl.stage(r, a.chunk)
    up = g > 0 and pl.where(g - 1)[0] != r
    down = g < pl.stages - 1 and pl.where(g + 1)[0] != r
    if a.kind == FWD:
        return [Action(RECV_ACT, a.mb, a.chunk)] * up, [Action(SEND_ACT, a.mb, a.chunk)] * down
    return [Action(RECV_GRAD, a.mb, a.chunk)] * down, [Action(SEND_GRAD, a.mb, a.chunk)] * up


def _pairs(send: Action, recv: Action, r: int, pl: Placement) -> bool:
    """A blocking send followed by a blocking receive with the same neighbour."""
    return (COMM.get(send.kind, (None, None))[1] == "send"
            and pl.neighbour(send.kind, r, send.chunk)[0] == pl.neighbour(recv.kind, r,
                                                                          recv.chunk)[0])


def _exchanged(send: Action, recv: Action) -> list:
    """Post the receive, post the send, wait for the send, wait for the receive."""
    s, q = COMM[send.kind][0], COMM[recv.kind][0]
    return [Action(KIND_OF[q, "irecv"], recv.mb, recv.chunk),
            Action(KIND_OF[s, "isend"], send.mb, send.chunk),
            Action(KIND_OF[s, "wait_send"], send.mb, send.chunk),
            Action(KIND_OF[q, "wait_recv"], recv.mb, recv.chunk)]


def overlapped(sched: Schedule) -> Schedule:
    """Rewrite a schedule so transfers can overlap compute; compute order is unchanged.

    Rules, per rank:
    - every send becomes a non-blocking isend at the same place (right after the compute that
      produced the tensor); all send completions (wait_send_*) move to just before `opt`, in post
      order, so no rank ever blocks on a send during the step;
    - the wait for a received tensor sits right before the compute that consumes it (fwd for an
      activation, bwd for a gradient);
    - a receive is posted as early as it legally can be with one pre-posted buffer per stream
      (activation stream, gradient stream): the first receive of a stream at the start of the
      step, each next one right after the wait of the previous one. That is always before the
      compute preceding its use, and keeps receive buffers at one per stream, so 1F1B's memory
      bound survives (posting all m receives up front would hold m buffers).
    """
    return Schedule([_overlap_rank(acts) for acts in sched], placement_of(sched))


def _overlap_rank(acts: list) -> list:
    computes = [a for a in acts if a.kind in COMPUTE]
    after = {}                        # compute index -> sends issued right after it
    recvs = {}                        # (stream, chunk) -> mb of each received message, in order
    n = -1
    for a in acts:
        if a.kind in COMPUTE:
            n += 1
            continue
        stream, role = COMM[a.kind]
        if role in ("send", "isend"):
            after.setdefault(n, []).append(Action(KIND_OF[stream, "isend"], a.mb, a.chunk))
        elif role in ("recv", "irecv"):
            recvs.setdefault((stream, a.chunk), []).append(a.mb)
    nxt = {st: 0 for st in recvs}     # next message of each stream to post
    waited = {st: 0 for st in recvs}  # messages of each stream already waited for

    def post(st, upto):               # post receives of stream st up to message index upto
        out = []
        while nxt[st] <= min(upto, len(recvs[st]) - 1):
            out.append(Action(KIND_OF[st[0], "irecv"], recvs[st][nxt[st]], st[1]))
            nxt[st] += 1
        return out

    new = [a for st in sorted(recvs) for a in post(st, 0)] + after.get(-1, [])
    sent = list(after.get(-1, []))
    for n, c in enumerate(computes):
        st = ("act" if c.kind == FWD else "grad" if c.kind in INPUT_GRAD else None, c.chunk)
        if st in recvs and c.mb in recvs[st]:
            k = recvs[st].index(c.mb)
            new += post(st, k) + [Action(KIND_OF[st[0], "wait_recv"], c.mb, c.chunk)]
            waited[st] += 1
            if nxt[st] == waited[st]:   # no receive outstanding: pre-post the next one
                new += post(st, nxt[st])
        if c.kind == OPT:
            new += [Action(KIND_OF[COMM[a.kind][0], "wait_send"], a.mb, a.chunk) for a in sent]
        new.append(c)
        new += after.get(n, [])
        sent += after.get(n, [])
    return new
