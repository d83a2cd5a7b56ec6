"""Check a schedule and predict its timeline, in pure Python (no MPI, no torch).

The model is deliberately conservative, so a schedule that could hang under MPI hangs here too:
every send is rendezvous (a ~1 MB tensor is above every MPI library's eager limit), i.e. a
message starts moving only once both its send and its receive are posted. Each rank runs its own
action list in order:

- fwd / bwd / opt take their duration;
- isend / irecv only post (they take their duration, 0 by default, and never block);
- a blocking send or receive posts, then blocks until the transfer is done;
- a wait blocks until the transfer of its posted message is done;
- a transfer starts when both sides are posted and takes `latency`.

Messages match by (stream act|grad, microbatch, source, destination, boundary chunk),
first-posted with first-posted, like MPI's ordering rule for one (source, tag) pair. With
several chunks per rank the schedule's placement (harness.schedule.Placement) says which rank
and chunk each message goes to; a boundary inside one rank (ZB-V's turn) is no message at all.

`protocol="eager"` models small messages instead (below the MPI library's eager limit): a send
never waits for its receive; the sender is done `latency` after posting, and the receiver gets
the message `latency` after both sides posted.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import (BWD, BWD_IN, BWD_W, COMM, COMPUTE, FWD, INPUT_GRAD, KINDS, OPT, Action,
                 placement_of)

# default costs: backward ~2x forward (two matmuls per one), split evenly into its input and
# weight halves
UNIT = {FWD: 1.0, BWD: 2.0, BWD_IN: 1.0, BWD_W: 1.0, OPT: 0.0}


class ScheduleError(ValueError):
    """The schedule breaks the executor's contract (docs/schedules.md)."""


class DeadlockError(ScheduleError):
    """Every unfinished rank is blocked on a transfer whose other side is never posted."""


@dataclass(frozen=True)
class PlannedOp:
    """One action of the planned timeline; times in the units of `durations` (unit costs: fwd=1)."""
    rank: int
    kind: str
    mb: int
    start: float
    end: float
    chunk: int = 0


def _static(sched) -> None:
    """The per-rank contract and send/receive matching; raises ScheduleError on the first breach."""
    p = len(sched)
    pl = placement_of(sched)
    last = pl.stages - 1
    ends = {}                                   # (stream, mb, src, dst, chunk) -> [sends, recvs]
    for r, acts in enumerate(sched):
        done = {FWD: set(), BWD: set(), BWD_IN: set(), BWD_W: set()}   # of (chunk, mb)
        have = {"act": set(), "grad": set()}    # (chunk, mb) received (completed) on this rank
        posted = {}                             # (stream, side, chunk, mb) -> posts not waited
        opts = [k for k, a in enumerate(acts) if getattr(a, "kind", None) == OPT]
        if len(opts) != 1:
            raise ScheduleError(f"rank {r}: has {len(opts)} opt actions; every rank ends with "
                                f"exactly one opt")
        if opts[0] != len(acts) - 1:
            raise ScheduleError(f"rank {r}: {acts[opts[0] + 1]!r} comes after opt; "
                                f"opt ends the step")

        def local(g, kinds, cm):     # was stage g's tensor for (chunk, mb) made on this rank?
            q, qc = pl.where(g)
            return q == r and any((qc, cm[1]) in done[k] for k in kinds)
        for a in acts:
            if not isinstance(a, Action):
                raise ScheduleError(f"rank {r}: {a!r} is not an Action")
            where = f"rank {r}: {a!r}"
            cm = (a.chunk, a.mb)
            if a.kind in COMPUTE and a.kind != OPT:
                if not 0 <= a.chunk < pl.v:
                    raise ScheduleError(f"{where}: chunk {a.chunk} does not exist ({pl.v} per rank)")
                g = pl.stage(r, a.chunk)
                if cm in done[a.kind] or (a.kind in INPUT_GRAD and cm in done[BWD] | done[BWD_IN]):
                    raise ScheduleError(f"{where} appears twice")
                if a.kind == FWD and g > 0 and cm not in have["act"] \
                        and not local(g - 1, (FWD,), cm):
                    raise ScheduleError(f"{where} runs before its activation arrived (needs "
                                        f"recv_act{a.mb} or wait_recv_act{a.mb} earlier)")
                if a.kind in (BWD, BWD_IN) and cm not in done[FWD]:
                    raise ScheduleError(f"{where} runs before fwd{a.mb}")
                if a.kind == BWD_W and cm not in done[BWD_IN]:
                    raise ScheduleError(f"{where} runs before bwd_in{a.mb} (W needs B's graph)")
                if a.kind in INPUT_GRAD and g < last and cm not in have["grad"] \
                        and not local(g + 1, INPUT_GRAD, cm):
                    raise ScheduleError(f"{where} runs before its gradient arrived (needs "
                                        f"recv_grad{a.mb} or wait_recv_grad{a.mb} earlier)")
                done[a.kind].add(cm)
            if a.kind in COMPUTE:
                continue
            stream, role = COMM[a.kind]
            side = "send" if "send" in role else "recv"
            q, qc, bc = pl.neighbour(a.kind, r, a.chunk)
            if not 0 <= q < p or q == r:
                raise ScheduleError(f"{where} has peer rank {q}, which does not exist "
                                    f"({p} stages: no communication past the pipeline ends)"
                                    if q != r else f"{where} would send to its own rank")
            made = done[FWD] if stream == "act" else done[BWD] | done[BWD_IN]
            if role in ("send", "isend") and cm not in made:
                need = "fwd" if stream == "act" else "bwd"
                raise ScheduleError(f"{where} to rank {q} before {need}{a.mb} produced it")
            if role.startswith("wait"):
                key = (stream, side, a.chunk, a.mb)
                if not posted.get(key):
                    raise ScheduleError(f"{where} without a matching i{side}_{stream}{a.mb} "
                                        f"posted before it")
                posted[key] -= 1
            else:
                src, dst = (r, q) if side == "send" else (q, r)
                ends.setdefault((stream, a.mb, src, dst, bc), [[], []])[side == "recv"].append(a)
                if role.startswith("i"):
                    key = (stream, side, a.chunk, a.mb)
                    posted[key] = posted.get(key, 0) + 1
            if side == "recv" and not role.startswith("i"):
                have[stream].add(cm)
        for (stream, side, _c, mb), n in posted.items():
            if n:
                raise ScheduleError(f"rank {r}: i{side}_{stream}{mb} is never completed "
                                    f"(no wait_{side}_{stream}{mb} after it)")
        for c, mb in sorted(done[FWD] - done[BWD] - done[BWD_W]):
            raise ScheduleError(f"rank {r}: {Action(FWD, mb, c)!r} has no bwd{mb} "
                                f"(or bwd_in{mb} and bwd_w{mb})")
        for c, mb in sorted(done[BWD_IN] - done[BWD_W]):
            raise ScheduleError(f"rank {r}: {Action(BWD_IN, mb, c)!r} has no bwd_w{mb}")
    for (stream, mb, src, dst, _c), (sends, recvs) in sorted(ends.items()):
        if len(sends) > len(recvs):
            raise ScheduleError(f"rank {src}: {sends[len(recvs)]!r} to rank {dst} has no "
                                f"matching receive (rank {dst} posts {len(recvs)} recv_{stream}{mb}/"
                                f"irecv_{stream}{mb}, needs {len(sends)})")
        if len(recvs) > len(sends):
            raise ScheduleError(f"rank {dst}: {recvs[len(sends)]!r} from rank {src} has no "
                                f"matching send (rank {src} posts {len(sends)} send_{stream}{mb}/"
                                f"isend_{stream}{mb}, needs {len(recvs)})")


def _cost(durations):
    """durations -> a function (rank, Action) -> seconds."""
    if durations is None:
        return lambda r, a: UNIT.get(a.kind, 0.0)
    if callable(durations):
        return durations
    unknown = set(durations) - set(KINDS)
    if unknown:
        raise ValueError(f"durations: unknown kinds {sorted(unknown)}; allowed: {', '.join(KINDS)}")
    if FWD not in durations or (BWD not in durations and BWD_IN not in durations):
        raise ValueError("durations: a dict needs at least 'fwd' and 'bwd' (or 'bwd_in' for "
                         "split backward; the rest default to 0)")
    return lambda r, a: durations.get(a.kind, 0.0)


class _Msg:
    """One message: when each side posted it (None until it has)."""
    __slots__ = ("post",)

    def __init__(self):
        self.post = {"send": None, "recv": None}


def _run(sched, cost, latency, eager: bool = False, gap=None) -> list:
    """Execute every rank's list against the message model; raise DeadlockError if stuck.
    latency: seconds, or (receiver's, sender's) seconds; gap(rank, Action, previous Action or
    None): local time before the action starts."""
    p = len(sched)
    lat_recv, lat_send = (latency, latency) if not isinstance(latency, tuple) else latency
    pl = placement_of(sched)
    msgs, count = {}, {}     # (stream, mb, src, dst, chunk) -> [_Msg]; (key, side) -> posts so far
    pc, t = [0] * p, [0.0] * p
    mine = [{} for _ in range(p)]  # per rank: (stream, side, mb) -> its posted, unwaited messages
    ops = []

    def post(r, a):
        stream, role = COMM[a.kind]
        side = "send" if "send" in role else "recv"
        q, _, bc = pl.neighbour(a.kind, r, a.chunk)
        key = (stream, a.mb) + ((r, q) if side == "send" else (q, r)) + (bc,)
        n = count.get((key, side), 0)
        count[key, side] = n + 1
        box = msgs.setdefault(key, [])
        while len(box) <= n:
            box.append(_Msg())
        box[n].post[side] = t[r]
        return box[n], side

    blocked = [None] * p           # (msg, side) a rank registered for its current blocking call
    gapped = [False] * p           # the rank's current action has had its gap already

    def step(r) -> bool:
        a = sched[r][pc[r]]
        if gap is not None and not gapped[r]:   # once, not again after being blocked
            g = gap(r, a, sched[r][pc[r] - 1] if pc[r] else None)
            if g < 0:
                raise ValueError(f"gap: rank {r} {a!r} has negative gap {g}")
            t[r] += g
            gapped[r] = True
        d = cost(r, a)
        if d < 0:
            raise ValueError(f"durations: rank {r} {a!r} has negative duration {d}")
        end = t[r] + d
        if a.kind not in COMPUTE:
            role = COMM[a.kind][1]
            if role in ("isend", "irecv"):
                msg, side = post(r, a)
                mine[r].setdefault((COMM[a.kind][0], side, a.chunk, a.mb), []).append(msg)
            else:
                if role in ("send", "recv"):
                    if blocked[r] is None:
                        blocked[r] = post(r, a)
                    msg, side = blocked[r]
                else:
                    side = role[len("wait_"):]
                    msg = mine[r][COMM[a.kind][0], side, a.chunk, a.mb][0]
                lat = lat_send if side == "send" else lat_recv
                if eager and side == "send":    # the message leaves without its receiver
                    end = max(end, msg.post["send"] + lat)
                else:
                    other = msg.post["recv" if side == "send" else "send"]
                    if other is None:
                        return False
                    end = max(end, max(msg.post.values()) + lat)
                blocked[r] = None
                if role.startswith("wait"):
                    mine[r][COMM[a.kind][0], side, a.chunk, a.mb].pop(0)
        ops.append(PlannedOp(r, a.kind, a.mb, t[r], end, a.chunk))
        t[r] = end
        pc[r] += 1
        gapped[r] = False
        return True

    progress = True
    while progress:
        progress = False
        for r in range(p):
            while pc[r] < len(sched[r]) and step(r):
                progress = True
    stuck = [r for r in range(p) if pc[r] < len(sched[r])]
    if stuck:
        parts = []
        for r in stuck:
            a = sched[r][pc[r]]
            q, what = pl.neighbour(a.kind, r, a.chunk)[0], "receive" if "send" in a.kind else "send"
            parts.append(f"rank {r} blocked at {a!r} (action {pc[r]}), waiting for rank {q} "
                         f"to post the matching {what}")
        raise DeadlockError("deadlock: " + "; ".join(parts))
    return sorted(ops, key=lambda o: (o.rank, o.start, o.end))


def check(sched) -> None:
    """Raise ScheduleError (or DeadlockError) if `sched` breaks the executor's contract or hangs.

    Whether a schedule deadlocks under this model does not depend on durations, so unit costs do.
    """
    _static(sched)
    _run(sched, _cost(None), 0.0)


def simulate(sched, durations=None, latency: float = 0.0, protocol: str = "rendezvous",
             gap=None) -> list:
    """The planned timeline: one PlannedOp per action, sorted by rank then start time.

    durations: None for unit costs (fwd 1, bwd 2, bwd_in 1, bwd_w 1, opt 0, communication
    calls 0); a dict
    kind -> seconds (needs fwd and bwd; other kinds default to 0); or a callable
    (rank, Action) -> seconds, e.g. measured per-op medians. Communication durations are the
    local cost of the call; the wire time of every message is `latency`, or a pair (seconds
    until the receive completes, until the send completes): under MPI a send can complete
    later than its receive (the receiver acknowledges at its next MPI call; on a loaded host
    much later). protocol: "rendezvous"
    (a send waits for its receive; the default, and what `check` uses) or "eager".
    gap: None, or a callable (rank, Action, the rank's previous Action or None) -> seconds the
    rank spends before the action starts (an executor's own time between two actions: it
    delays a communication call's post, unlike the call's duration, which follows it).
    """
    if protocol not in ("rendezvous", "eager"):
        raise ValueError(f"protocol={protocol!r}: allowed rendezvous, eager")
    _static(sched)
    latency = tuple(map(float, latency)) if isinstance(latency, (tuple, list)) else float(latency)
    return _run(sched, _cost(durations), latency, protocol == "eager", gap)


def makespan(ops) -> float:
    """Span of the step: last end minus first start over all ranks."""
    return max(o.end for o in ops) - min(o.start for o in ops)


def idle_share(ops) -> list:
    """Per rank, the share of the span not spent computing (fwd, bwd, bwd_in, bwd_w, opt): the
    bubble."""
    span = makespan(ops)
    ranks = max(o.rank for o in ops) + 1
    busy = [0.0] * ranks
    for o in ops:
        if o.kind in COMPUTE:   # compute on one rank is sequential, so the union is the sum
            busy[o.rank] += o.end - o.start
    return [(span - b) / span if span else 0.0 for b in busy]


def to_frame(ops):
    """Long-form pandas DataFrame, one row per op: rank, kind, mb, start, end, chunk."""
    import pandas as pd  # lazily: the simulator itself needs no third-party package
    return pd.DataFrame([(o.rank, o.kind, o.mb, o.start, o.end, o.chunk) for o in ops],
                        columns=["rank", "kind", "mb", "start", "end", "chunk"])
