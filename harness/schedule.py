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

import re
from dataclasses import dataclass

from . import runformat

# Compute. bwd is the whole backward of a chunk; split backward runs it as two actions:
# bwd_in (the gradient with respect to the chunk's input, sent upstream at once: the zero-bubble
# paper's B, PyTorch's I) and bwd_w (the gradient with respect to its weights, later: W).
FWD, BWD, OPT = "fwd", "bwd", "opt"
BWD_IN, BWD_W = "bwd_in", "bwd_w"
# Blocking point-to-point (MPI Send/Recv)
SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = "send_act", "recv_act", "send_grad", "recv_grad"
# Non-blocking point-to-point (MPI Isend/Irecv) and their completion (MPI Wait)
ISEND_ACT, IRECV_ACT, ISEND_GRAD, IRECV_GRAD = "isend_act", "irecv_act", "isend_grad", "irecv_grad"
WAIT_SEND_ACT, WAIT_RECV_ACT = "wait_send_act", "wait_recv_act"
WAIT_SEND_GRAD, WAIT_RECV_GRAD = "wait_send_grad", "wait_recv_grad"

KINDS = (FWD, BWD, OPT, SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD,
         ISEND_ACT, IRECV_ACT, ISEND_GRAD, IRECV_GRAD,
         WAIT_SEND_ACT, WAIT_RECV_ACT, WAIT_SEND_GRAD, WAIT_RECV_GRAD, BWD_IN, BWD_W)
COMPUTE = (FWD, BWD, OPT, BWD_IN, BWD_W)
# compute that produces the gradient sent upstream, and compute that ends a microbatch's life
INPUT_GRAD = (BWD, BWD_IN)
RELEASES = (BWD, BWD_W)
# one letter per compute kind in an action's compact name, as torch.distributed.pipelining
# spells them (F forward, B full backward, I input gradient, W weight gradient)
LETTER = {FWD: "F", BWD: "B", BWD_IN: "I", BWD_W: "W"}

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


@dataclass(frozen=True)
class Placement:
    """Which global stage each (rank, chunk) holds: p ranks, v chunks each, p·v stages.

    style "loop" (Megatron-LM's interleaving): rank r holds stages r, r+p, r+2p, ..., so the
    activation of stage p-1 (rank p-1) wraps to stage p on rank 0. style "v" (ZB-V, DualPipeV):
    even chunks run down the ranks, odd chunks back up, so rank r holds stages r and 2p-1-r and
    the turn at the bottom (stage p-1 -> p, both on rank p-1) never leaves the rank.
    """
    p: int
    v: int = 1
    style: str = "loop"

    @property
    def stages(self) -> int:
        return self.p * self.v

    def stage(self, rank: int, chunk: int) -> int:
        up = self.style == "v" and chunk % 2
        return chunk * self.p + (self.p - 1 - rank if up else rank)

    def where(self, stage: int) -> tuple[int, int]:
        """(rank, chunk) of a global stage."""
        c, k = divmod(stage, self.p)
        return (self.p - 1 - k if self.style == "v" and c % 2 else k), c

    def neighbour(self, kind: str, rank: int, chunk: int) -> tuple[int, int, int]:
        """(peer rank, peer chunk, boundary chunk) of a communication action: activations go
        from stage g to g+1, gradients from g+1 to g; the boundary chunk (the upstream stage's
        chunk) tells apart the messages of one rank pair (runformat.tag)."""
        g = self.stage(rank, chunk)
        down = sending(kind) == (COMM[kind][0] == "act")    # towards the loss
        q = g + 1 if down else g - 1
        if not 0 <= q < self.stages:
            return (rank + 1 if down else rank - 1), chunk, chunk   # malformed: past the ends
        qr, qc = self.where(q)
        return qr, qc, chunk if down else qc


def placement_of(sched) -> Placement:
    """The placement of a schedule: its own (`Schedule.placement`) or, for a plain list of
    action lists, round-robin with as many chunks as its actions name."""
    pl = getattr(sched, "placement", None)
    if pl is not None:
        return pl
    v = 1 + max((a.chunk for acts in sched for a in acts if hasattr(a, "chunk")), default=0)
    return Placement(len(sched), v)


def peer(kind: str, rank: int, chunk: int = 0, placement: Placement | None = None) -> int:
    """The other rank of a communication action on `rank` (may be outside 0..p-1 if malformed).
    Without a placement: one chunk per rank, activations to rank+1, gradients to rank-1."""
    if placement is None:
        return rank + 1 if sending(kind) == (COMM[kind][0] == "act") else rank - 1
    return placement.neighbour(kind, rank, chunk)[0]


def message(kind: str, rank: int, step: int, mb: int, chunk: int = 0,
            placement: Placement | None = None) -> tuple[int, int, str]:
    """(peer, MPI tag, pair id) of the message a communication action on `rank` moves; both
    sides of a message compute the same tag and pair id (runformat)."""
    stream = COMM[kind][0]
    if placement is None:
        q, bc = peer(kind, rank), 0
    else:
        q, _, bc = placement.neighbour(kind, rank, chunk)
    src, dst = (rank, q) if sending(kind) else (q, rank)
    return q, runformat.tag(stream, mb, bc), runformat.pair_id(stream, step, mb, src, dst, bc)


@dataclass(frozen=True)
class Action:
    """One instruction of one rank: `kind` applied to microbatch `mb` (-1 for `opt`) of the
    rank's model chunk `chunk` (0 unless the rank holds several: pipeline.virtual)."""
    kind: str
    mb: int = -1
    chunk: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; allowed: {', '.join(KINDS)}")

    def __repr__(self):  # short form for error messages and tests: fwd0, recv_act1, opt, fwd0@1
        s = self.kind if self.mb < 0 else f"{self.kind}{self.mb}"
        return s + (f"@{self.chunk}" if self.chunk else "")

    @property
    def name(self) -> str:
        """Compact printable name, as torch.distributed.pipelining's `_Action`: chunk, letter,
        microbatch for compute (`0F3`, `1I2`, `0W1`, `0B0`), chunk, kind, microbatch for
        communication (`1isend_act2`), `opt` alone. `Action.parse(a.name) == a`."""
        if self.kind == OPT:
            return OPT
        return f"{self.chunk}{LETTER.get(self.kind, self.kind)}{self.mb}"

    @classmethod
    def parse(cls, name: str) -> "Action":
        if name == OPT:
            return cls(OPT)
        m = re.fullmatch(r"(\d+)([A-Za-z_]+?)(\d+)", name)
        if not m:
            raise ValueError(f"{name!r} is not an action name (e.g. 0F3, 1I2, 0W1, 0send_act2)")
        kind = {v: k for k, v in LETTER.items()}.get(m.group(2), m.group(2))
        return cls(kind, int(m.group(3)), int(m.group(1)))


class Schedule(list):
    """list[list[Action]], one action list per rank, plus the placement of its chunks (a plain
    list of lists is a schedule too: round-robin placement)."""

    def __init__(self, ranks=(), placement: Placement | None = None):
        super().__init__(ranks)
        self.placement = placement or placement_of(list(self))


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


def build(name: str, p: int, m: int, overlap: bool = False, virtual: int = 1) -> Schedule:
    """The action lists of schedule `name` for p ranks, m microbatches and `virtual` chunks per
    rank (pipeline.virtual; naive, gpipe, 1f1b and zb_h1 take 1, interleaved >= 2, zbv and
    dualpipev 2)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r}: allowed {', '.join(SCHEDULES)}")
    if name in VIRTUAL:
        return SCHEDULES[name](p, m, virtual)      # always non-blocking (schedule_zb.py)
    if virtual != 1:
        raise ValueError(f"pipeline.virtual={virtual!r}: schedule={name!r} holds one chunk per "
                         f"rank (virtual stages: schedule=interleaved, zbv or dualpipev)")
    sched = Schedule(SCHEDULES[name](p, m), Placement(p))
    return overlapped(sched) if overlap else sched


def in_flight(acts: list) -> list:
    """Chunk-microbatches in flight (fwd done, its activations not yet released by bwd or
    bwd_w) after each action of one rank's list."""
    held, out = 0, []
    for a in acts:
        held += (a.kind == FWD) - (a.kind in RELEASES)
        out.append(held)
    return out


def peak_bytes(acts: list, chunk_bytes) -> int:
    """Most activation bytes one rank holds at once, when each chunk-microbatch in flight
    holds chunk_bytes[chunk] (chunks of unequal size weigh what they save)."""
    held = peak = 0
    for a in acts:
        if a.kind == FWD:
            held += chunk_bytes[a.chunk]
        elif a.kind in RELEASES:
            held -= chunk_bytes[a.chunk]
        peak = max(peak, held)
    return peak


def pebble_theory(sched, stage_bytes) -> dict | None:
    """meta.json's `pebbles_theory` from per-global-stage bytes per microbatch (None: no
    formula): per rank the bytes one microbatch leaves through all its chunks, per chunk, and
    the peak, walked from the schedule."""
    if not stage_bytes:
        return None
    pl = placement_of(sched)
    per_chunk = [[stage_bytes[pl.stage(r, c)] for c in range(pl.v)] for r in range(pl.p)]
    return {"bytes_per_microbatch": [sum(b) for b in per_chunk],
            "bytes_per_chunk": per_chunk,
            "peak_bytes": [peak_bytes(acts, b) for acts, b in zip(sched, per_chunk)]}


# The closed-form bubble of each schedule, for equal per-stage fwd and bwd times and free
# communication: (formula as text, function of p and m). The one definition of the theory;
# the analysis, the reports and the figures use it (bubble, BUBBLE_FORMULA; the virtual-stage
# and zero-bubble schedules' own formulas, with v and F/B/W times, join them from
# schedule_zb.VIRTUAL at the end of this module).
_BUBBLE = {
    "naive": ("(p-1)/p", lambda p, m: (p - 1) / p),                       # one stage at a time
    "gpipe": ("(p-1)/(m+p-1)", lambda p, m: (p - 1) / (m + p - 1)),       # Huang et al. 2019
    "1f1b": ("(p-1)/(m+p-1)", lambda p, m: (p - 1) / (m + p - 1)),        # Narayanan et al. 2021
}
BUBBLE_FORMULA = {name: f for name, (f, _) in _BUBBLE.items()}


def bubble(name: str, p: int, m: int, virtual: int = 1, times=None) -> float | None:
    """Theoretical bubble (idle share of each rank's step) of schedule `name`; None if unknown.
    times: per-chunk {fwd, bwd_in, bwd_w} for the split-backward schedules (default 1, 1, 1)."""
    if name in VIRTUAL:
        return VIRTUAL[name].bubble(p, m, virtual, times)
    return _BUBBLE[name][1](p, m) if name in _BUBBLE else None


def theory(name: str, p: int, m: int, virtual: int = 1) -> dict:
    """Numbers the analysis compares measurements against, for equal per-stage fwd and bwd times.

    bubble: idle share of each rank's step. Naive: (p-1)/p. GPipe (Huang et al. 2019) and
      1F1B (Narayanan et al. 2021, PipeDream-flush): (p-1)/(m+p-1).
    peak_in_flight: per stage, the most microbatches whose activations it holds at once, walked
      from the schedule itself (closed forms: naive 1, gpipe m, 1f1b min(m, p-s)).
    messages: point-to-point messages per step, one activation and one gradient per boundary
      between two ranks and microbatch: 2·(p-1)·m with one chunk per rank.
    The split-backward and virtual-stage schedules (schedule_zb.py) count chunk-microbatches
    in flight, from fwd to the bwd_w (or bwd) that releases them.
    """
    sched = build(name, p, m, virtual=virtual)
    pl = placement_of(sched)
    local = sum(pl.where(g)[0] == pl.where(g + 1)[0] for g in range(pl.stages - 1))
    return {"bubble": bubble(name, p, m, virtual),
            "peak_in_flight": [max(in_flight(acts)) for acts in sched],
            "messages": 2 * (pl.stages - 1 - local) * m}


def to_json(sched: Schedule, name: str, m: int, overlap: bool) -> dict:
    """The `schedule.json` form (docs/run-format.md): actions as [kind, mb] with one chunk per
    rank (readable by older loaders), [kind, mb, chunk] with several."""
    pl = placement_of(sched)
    row = (lambda a: [a.kind, a.mb]) if pl.v == 1 else (lambda a: [a.kind, a.mb, a.chunk])
    return {"name": name, "stages": len(sched), "microbatches": m, "overlap": overlap,
            "virtual": pl.v, "placement": pl.style,
            "actions": [[row(a) for a in acts] for acts in sched]}


def from_json(obj: dict) -> Schedule:
    """Inverse of to_json; accepts files written before chunks existed (2-field actions)."""
    ranks = [[Action(*a) for a in acts] for acts in obj["actions"]]
    pl = Placement(len(ranks), obj.get("virtual", 1), obj.get("placement", "loop"))
    return Schedule(ranks, pl)


from .schedule_zb import VIRTUAL  # noqa: E402  (the zoo below imports the IR above)

SCHEDULES.update({name: th.build for name, th in VIRTUAL.items()})
BUBBLE_FORMULA.update({name: th.bubble_formula for name, th in VIRTUAL.items()})
