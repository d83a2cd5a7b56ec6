"""Pipeline schedules as data.

A schedule is, for each rank, the ordered list of actions that rank performs in one training step
(ShallowSpeed's instruction stream, torch.distributed.pipelining's `_Action` IR). The same lists are
run by `harness.executor`, checked by `harness.simulate` and drawn by the analysis, so what is
planned, checked and measured is one object.

Peers are implicit: activations go from stage s to s+1, gradients from s+1 to s. A generator never
emits a communication action that would cross the pipeline's ends, so executor code has no
first/last-stage branches.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import runformat

# Compute
FWD, BWD, OPT = "fwd", "bwd", "opt"
# Blocking point-to-point (MPI Send/Recv)
SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = "send_act", "recv_act", "send_grad", "recv_grad"
# Non-blocking point-to-point (MPI Isend/Irecv) and their completion (MPI Wait)
ISEND_ACT, IRECV_ACT, ISEND_GRAD, IRECV_GRAD = "isend_act", "irecv_act", "isend_grad", "irecv_grad"
WAIT_SEND_ACT, WAIT_RECV_ACT = "wait_send_act", "wait_recv_act"
WAIT_SEND_GRAD, WAIT_RECV_GRAD = "wait_send_grad", "wait_recv_grad"

KINDS = (FWD, BWD, OPT, SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD,
         ISEND_ACT, IRECV_ACT, ISEND_GRAD, IRECV_GRAD,
         WAIT_SEND_ACT, WAIT_RECV_ACT, WAIT_SEND_GRAD, WAIT_RECV_GRAD)
COMPUTE = (FWD, BWD, OPT)

# kind -> (stream, role). stream: "act" flows s -> s+1, "grad" flows s+1 -> s.
# role: a blocking call ("send"/"recv"), a non-blocking post ("isend"/"irecv") or its completion.
COMM = {SEND_ACT: ("act", "send"), RECV_ACT: ("act", "recv"),
        SEND_GRAD: ("grad", "send"), RECV_GRAD: ("grad", "recv"),
        ISEND_ACT: ("act", "isend"), IRECV_ACT: ("act", "irecv"),
        ISEND_GRAD: ("grad", "isend"), IRECV_GRAD: ("grad", "irecv"),
        WAIT_SEND_ACT: ("act", "wait_send"), WAIT_RECV_ACT: ("act", "wait_recv"),
        WAIT_SEND_GRAD: ("grad", "wait_send"), WAIT_RECV_GRAD: ("grad", "wait_recv")}
# the kind of each (stream, role), the inverse of COMM
KIND_OF = {v: k for k, v in COMM.items()}


def sending(kind: str) -> bool:
    """Is this communication action the sending side (send, isend, wait_send)?"""
    return COMM[kind][1] in ("send", "isend", "wait_send")


def peer(kind: str, rank: int) -> int:
    """The other rank of a communication action on `rank` (may be outside 0..p-1 if malformed)."""
    # activations travel downstream, gradients upstream
    return rank + 1 if sending(kind) == (COMM[kind][0] == "act") else rank - 1


def message(kind: str, rank: int, step: int, mb: int) -> tuple[int, int, str]:
    """(peer, MPI tag, pair id) of the message a communication action on `rank` moves; both
    sides of a message compute the same tag and pair id (runformat)."""
    stream = COMM[kind][0]
    q = peer(kind, rank)
    src, dst = (rank, q) if sending(kind) else (q, rank)
    return q, runformat.tag(stream, mb), runformat.pair_id(stream, step, mb, src, dst)


@dataclass(frozen=True)
class Action:
    """One instruction of one rank: `kind` applied to microbatch `mb` (-1 for `opt`)."""
    kind: str
    mb: int = -1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; allowed: {', '.join(KINDS)}")

    def __repr__(self):  # short form for error messages and tests: fwd0, recv_act1, opt
        return self.kind if self.mb < 0 else f"{self.kind}{self.mb}"


Schedule = list  # list[list[Action]]: one action list per stage (rank)


def _check_args(p: int, m: int) -> None:
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"world size {p!r}: a pipeline needs at least 1 stage (rank)")
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"pipeline.microbatches={m!r}: must be an integer >= 1")


def _recv(s, i):  # receive activation i, unless stage 0 (which has the data)
    return [Action(RECV_ACT, i)] if s > 0 else []


def _send(s, p, i):  # send activation i downstream, unless last stage
    return [Action(SEND_ACT, i)] if s < p - 1 else []


def _recv_g(s, p, j):  # receive gradient j, unless last stage (it computes the loss itself)
    return [Action(RECV_GRAD, j)] if s < p - 1 else []


def _send_g(s, j):  # send gradient j upstream, unless stage 0
    return [Action(SEND_GRAD, j)] if s > 0 else []


def naive(p: int, m: int = 1) -> Schedule:
    """Naive model parallelism: the whole batch forward through every stage, then backward.

    Stage s: recv activation, forward, send activation; then recv gradient, backward, send
    gradient; then the optimizer step. One stage computes at a time; bubble (p-1)/p.
    """
    if m != 1:
        raise ValueError(f"pipeline.microbatches={m!r}: schedule='naive' runs the whole batch "
                         f"at once, so the only allowed value is 1 "
                         f"(use schedule='gpipe' or '1f1b' for microbatches)")
    return gpipe(p, 1)


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (Huang et al. 2019): all m forwards, then all m backwards, then one optimizer step.

    Backwards run in microbatch order 0..m-1 on every stage, as PyTorch's ScheduleGPipe does; any
    order consistent across stages gives the same bubble, (p-1)/(m+p-1) for equal stage times.
    Blocking Send/Recv suffice: every transfer goes one way down (or up) a chain, so no two
    neighbours ever send to each other at once.
    """
    _check_args(p, m)
    out = []
    for s in range(p):
        acts = []
        for i in range(m):
            acts += _recv(s, i) + [Action(FWD, i)] + _send(s, p, i)
        for j in range(m):
            acts += _recv_g(s, p, j) + [Action(BWD, j)] + _send_g(s, j)
        out.append(acts + [Action(OPT)])
    return out


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B / PipeDream-flush (Narayanan et al. 2021), communication as in Megatron-LM.

    Stage s runs w = min(p-s-1, m) warm-up forwards, then m-w rounds of one forward and one
    backward, then w cool-down backwards; it holds at most min(m, p-s) microbatches in flight.
    In the steady state both neighbours have something to send each other at the same moment
    (s its activation, s+1 its gradient). Blocking rendezvous sends would deadlock there, so,
    like Megatron-LM's `send_forward_recv_backward` / `send_backward_recv_forward`, each steady
    exchange posts the receive and the send, then waits for both.
    """
    _check_args(p, m)
    out = []
    for s in range(p):
        w = min(p - s - 1, m)
        acts = []
        for i in range(w):                                   # warm-up
            acts += _recv(s, i) + [Action(FWD, i)] + _send(s, p, i)
        if w < m:
            acts += _recv(s, w)
        for k in range(m - w):                               # steady: fwd i, bwd j
            i, j = w + k, k
            acts.append(Action(FWD, i))
            if s < p - 1:                                    # send_forward_recv_backward
                acts += [Action(IRECV_GRAD, j), Action(ISEND_ACT, i),
                         Action(WAIT_SEND_ACT, i), Action(WAIT_RECV_GRAD, j)]
            acts.append(Action(BWD, j))
            if s > 0 and k < m - w - 1:                      # send_backward_recv_forward
                acts += [Action(IRECV_ACT, i + 1), Action(ISEND_GRAD, j),
                         Action(WAIT_SEND_GRAD, j), Action(WAIT_RECV_ACT, i + 1)]
            elif s > 0:                                      # last round: nothing left to receive
                acts.append(Action(SEND_GRAD, j))
        for j in range(m - w, m):                            # cool-down
            acts += _recv_g(s, p, j) + [Action(BWD, j)] + _send_g(s, j)
        out.append(acts + [Action(OPT)])
    return out


SCHEDULES = {"naive": naive, "gpipe": gpipe, "1f1b": one_f_one_b}


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
    return [_overlap_rank(acts) for acts in sched]


def _overlap_rank(acts: list) -> list:
    computes = [a for a in acts if a.kind in COMPUTE]
    after = {}                        # compute index -> sends issued right after it
    recvs = {"act": [], "grad": []}   # mb of each received message, per stream, in order
    n = -1
    for a in acts:
        if a.kind in COMPUTE:
            n += 1
            continue
        stream, role = COMM[a.kind]
        if role in ("send", "isend"):
            after.setdefault(n, []).append(Action(KIND_OF[stream, "isend"], a.mb))
        elif role in ("recv", "irecv"):
            recvs[stream].append(a.mb)
    nxt = {st: 0 for st in recvs}     # next message of each stream to post
    waited = {st: 0 for st in recvs}  # messages of each stream already waited for

    def post(st, upto):               # post receives of stream st up to message index upto
        out = []
        while nxt[st] <= min(upto, len(recvs[st]) - 1):
            out.append(Action(KIND_OF[st, "irecv"], recvs[st][nxt[st]]))
            nxt[st] += 1
        return out

    new = post("act", 0) + post("grad", 0) + after.get(-1, [])
    sent = list(after.get(-1, []))
    for n, c in enumerate(computes):
        st = {FWD: "act", BWD: "grad"}.get(c.kind)
        if st and c.mb in recvs[st]:
            k = recvs[st].index(c.mb)
            new += post(st, k) + [Action(KIND_OF[st, "wait_recv"], c.mb)]
            waited[st] += 1
            if nxt[st] == waited[st]:   # no receive outstanding: pre-post the next one
                new += post(st, nxt[st])
        if c.kind == OPT:
            new += [Action(KIND_OF[COMM[a.kind][0], "wait_send"], a.mb) for a in sent]
        new.append(c)
        new += after.get(n, [])
        sent += after.get(n, [])
    return new


def build(name: str, p: int, m: int, overlap: bool = False) -> Schedule:
    """The action lists of schedule `name` for p stages and m microbatches."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r}: allowed {', '.join(SCHEDULES)}")
    sched = SCHEDULES[name](p, m)
    return overlapped(sched) if overlap else sched


def in_flight(acts: list) -> list:
    """Microbatches in flight (fwd done, bwd not yet) after each action of one rank's list."""
    held, out = 0, []
    for a in acts:
        held += (a.kind == FWD) - (a.kind == BWD)
        out.append(held)
    return out


# The closed-form bubble of each schedule, for equal per-stage fwd and bwd times and free
# communication: (formula as text, function of p and m). The one definition of the theory;
# the analysis, the reports and the figures use it (bubble, BUBBLE_FORMULA).
_BUBBLE = {
    "naive": ("(p-1)/p", lambda p, m: (p - 1) / p),                       # one stage at a time
    "gpipe": ("(p-1)/(m+p-1)", lambda p, m: (p - 1) / (m + p - 1)),       # Huang et al. 2019
    "1f1b": ("(p-1)/(m+p-1)", lambda p, m: (p - 1) / (m + p - 1)),        # Narayanan et al. 2021
}
BUBBLE_FORMULA = {name: f for name, (f, _) in _BUBBLE.items()}


def bubble(name: str, p: int, m: int) -> float | None:
    """Theoretical bubble (idle share of each rank's step) of schedule `name`; None if unknown."""
    return _BUBBLE[name][1](p, m) if name in _BUBBLE else None


def theory(name: str, p: int, m: int) -> dict:
    """Numbers the analysis compares measurements against, for equal per-stage fwd and bwd times.

    bubble: idle share of each rank's step. Naive: (p-1)/p. GPipe (Huang et al. 2019) and
      1F1B (Narayanan et al. 2021, PipeDream-flush): (p-1)/(m+p-1).
    peak_in_flight: per stage, the most microbatches whose activations it holds at once, walked
      from the schedule itself (closed forms: naive 1, gpipe m, 1f1b min(m, p-s)).
    messages: point-to-point messages per step, one activation and one gradient per boundary
      and microbatch: 2·(p-1)·m.
    """
    sched = build(name, p, m)
    return {"bubble": bubble(name, p, m),
            "peak_in_flight": [max(in_flight(acts)) for acts in sched],
            "messages": 2 * (p - 1) * m}


def to_json(sched: Schedule, name: str, m: int, overlap: bool) -> dict:
    """The `schedule.json` form (docs/run-format.md)."""
    return {"name": name, "stages": len(sched), "microbatches": m, "overlap": overlap,
            "actions": [[[a.kind, a.mb] for a in acts] for acts in sched]}


def from_json(obj: dict) -> Schedule:
    return [[Action(k, mb) for k, mb in acts] for acts in obj["actions"]]
