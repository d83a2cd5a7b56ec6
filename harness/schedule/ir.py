"""The schedule IR: actions, where each chunk sits, and the schedule.json form.

A schedule is, for each rank, the ordered list of actions that rank performs in one training step
(ShallowSpeed's instruction stream, torch.distributed.pipelining's `_Action` IR). The same lists are
run by `harness.core.executor`, checked by `harness.schedule.simulate` and drawn by the analysis,
so what is planned, checked and measured is one object.

Peers are implicit: activations go from stage s to s+1, gradients from s+1 to s. A generator never
emits a communication action that would cross the pipeline's ends, so executor code has no
first/last-stage branches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .. import runformat

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
    list of lists is a schedule too: round-robin placement) and what it was built as: `name`,
    `microbatches` and `overlap` (harness.schedule.build sets them; None for a hand-made one).
    One object is all a run passes around: the executor, schedule.json and meta.json read it."""

    def __init__(self, ranks=(), placement: Placement | None = None, name: str | None = None,
                 microbatches: int | None = None, overlap: bool | None = None):
        super().__init__(ranks)
        self.placement = placement or placement_of(list(self))
        self.name, self.microbatches, self.overlap = name, microbatches, overlap


def check_args(p: int, m: int) -> None:
    """What every generator checks first: p ranks and m microbatches, both >= 1."""
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"world size {p!r}: a pipeline needs at least 1 stage (rank)")
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"pipeline.microbatches={m!r}: must be an integer >= 1")


def check_virtual(name: str, v: int, ok: bool, need: str) -> None:
    """pipeline.virtual must be what schedule `name` needs (`need`, as the message says it)."""
    if not ok:
        raise ValueError(f"pipeline.virtual={v!r}: schedule={name!r} needs {need}")


def to_json(sched: Schedule, name: str | None = None, m: int | None = None,
            overlap: bool | None = None) -> dict:
    """The `schedule.json` form (docs/run-format.md): actions as [kind, mb] with one chunk per
    rank (readable by older loaders), [kind, mb, chunk] with several. name, m, overlap: the
    schedule's own unless given (a plain list of lists knows none)."""
    pl = placement_of(sched)
    name = getattr(sched, "name", None) if name is None else name
    m = getattr(sched, "microbatches", None) if m is None else m
    overlap = getattr(sched, "overlap", None) if overlap is None else overlap
    row = (lambda a: [a.kind, a.mb]) if pl.v == 1 else (lambda a: [a.kind, a.mb, a.chunk])
    return {"name": name, "stages": len(sched), "microbatches": m, "overlap": overlap,
            "virtual": pl.v, "placement": pl.style,
            "actions": [[row(a) for a in acts] for acts in sched]}


def from_json(obj: dict) -> Schedule:
    """Inverse of to_json; accepts files written before chunks existed (2-field actions)."""
    ranks = [[Action(*a) for a in acts] for acts in obj["actions"]]
    pl = Placement(len(ranks), obj.get("virtual", 1), obj.get("placement", "loop"))
    return Schedule(ranks, pl, obj.get("name"), obj.get("microbatches"), obj.get("overlap"))
