"""The executor's gaps between actions and the messages' times, for a target configuration.

Gaps (calibrate.py measures them per rank and transition: previous action kind -> kind) are
looked up for each transition the target's schedule has, from the most to the least specific
measurement, and every step that is not the first is said in `assumed`:

1. the same rank and transition (a target rank maps onto the calibration rank of the same
   position: first, last, or in between, proportionally);
2. the same transition on any calibration rank;
3. the same kinds of action, whatever stream they carry (send_act ~ send_grad) or however the
   backward is split (bwd_in, bwd_w ~ bwd);
4. blocking and non-blocking posts alike (isend ~ send, irecv ~ recv; a wait ~ any wait:
   overlap=true from a run without it);
5. the median of the rank's gaps into an action of that class from an action of the same
   category as the previous one (compute, or a message call: a post, a wait, a blocking send
   or receive); else the median of the gaps between the same categories (the rank's, then any
   rank's): what the executor does between two actions depends mostly on what it just
   finished: after a compute action it frees the graph and books the step (~50-100 µs on the
   development VM), after a post it goes on at once (5-35 µs), so a 1F1B's irecv -> isend or
   wait -> wait from a GPipe run is a gap between two message calls, not the median gap into a
   send (which follows a backward there: 2-4x too long, measured);
6. the median of every gap into an action of that class on the rank, then of all its gaps;
7. zero (nothing measured at all).

Messages: seconds per message as c + k·bytes through the median transfer time of each measured
message size (through the origin for one size), times the step's own transfers over those
medians (a step whose messages ran slow keeps them slow); the same, apart, for the time until
the send completes (later than the receive on a loaded host). A run without messages (one
process) takes ASSUMED_MESSAGE, said so.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.predict.costs import fit

# a message on the development VM's MPICH shared memory: ~20 µs + bytes / 3 GB/s
# (a 64 KiB message measured 40-45 µs between two ranks, docs/results.md)
ASSUMED_MESSAGE = (20e-6, 1 / 3e9)


def _cls(kind: str) -> str:
    """A kind without its stream and without how the backward is split."""
    if kind in ("bwd_in", "bwd_w"):
        return "bwd"
    for s in ("_act", "_grad"):
        if kind.endswith(s):
            return kind[: -len(s)]
    return kind


def _blocking(kind: str) -> str:
    """_cls, with non-blocking posts as blocking calls and every wait as one kind."""
    c = _cls(kind)
    return {"isend": "send", "irecv": "recv", "wait_send": "wait", "wait_recv": "wait"}.get(c, c)


COMPUTE = ("fwd", "bwd", "opt", "bwd_in", "bwd_w")


def _compute(kind: str) -> bool:
    """Whether an action computes (else it is a message call: a post, a wait, a send/recv)."""
    return kind in COMPUTE


def _what(compute: bool) -> str:
    return "compute action" if compute else "message call"


def _median(vals) -> float:
    return float(np.median(vals)) if len(vals) else float("nan")


class Gaps:
    """Per target (rank, prev, kind): which measured gap stands for it (module docstring)."""

    def __init__(self, steps: list, p_cal: int, assumed: set):
        self.assumed, self.p_cal = assumed, p_cal
        per = {}
        for st in steps:
            for key, v in st.gap.items():
                per.setdefault(key, []).append(v)
        self.typical = {k: _median(v) for k, v in per.items()}
        self.memo = {}

    def cal_rank(self, r: int, p: int) -> int:
        """The calibration rank in the same position in the pipeline as target rank r of p."""
        if p == self.p_cal or p <= 1:
            return min(r, self.p_cal - 1)
        return int(round(r * (self.p_cal - 1) / (p - 1)))

    def source(self, r: int, p: int, prev: str, kind: str):
        """-> a measured key (rank, prev, kind) or a number of seconds, for the transition."""
        key = (r, p, prev, kind)
        if key not in self.memo:
            self.memo[key] = self._resolve(r, p, prev, kind)
        return self.memo[key]

    def _resolve(self, r, p, prev, kind):
        rc, typ = self.cal_rank(r, p), self.typical
        if (rc, prev, kind) in typ:
            return (rc, prev, kind)
        say = f"gap {prev} -> {kind} on rank {r}: not measured; "
        on_any = [k for k in typ if k[1:] == (prev, kind)]
        if on_any:
            return on_any[0]
        for level, norm, what in ((3, _cls, "its stream or split ignored"),
                                  (4, _blocking, "non-blocking calls taken as blocking")):
            for rank_ok in (lambda k: k[0] == rc, lambda k: True):
                like = [k for k in typ if rank_ok(k) and norm(k[1]) == norm(prev)
                        and norm(k[2]) == norm(kind)]
                if like:
                    self.assumed.add(say + f"took {like[0][1]} -> {like[0][2]} "
                                     f"({typ[like[0]] * 1e6:.0f} µs; {what})")
                    return like[0]
        # the gap is mostly the executor's work after the previous action (a compute action
        # frees its graph, a post returns at once): keep its category (compute or message)
        cat = (_compute(prev), _compute(kind))
        into = [v for k, v in typ.items() if k[0] == rc and _blocking(k[2]) == _blocking(kind)
                and _compute(k[1]) == cat[0]]
        if into:
            v = _median(into)
            self.assumed.add(say + f"took the median gap from a {_what(cat[0])} into a "
                                   f"{_blocking(kind)} ({v * 1e6:.0f} µs)")
            return v
        for rank_ok in (lambda k: k[0] == rc, lambda k: True):
            same = [v for k, v in typ.items() if rank_ok(k) and (_compute(k[1]),
                                                                _compute(k[2])) == cat]
            if same:
                v = _median(same)
                self.assumed.add(say + f"took the median gap from a {_what(cat[0])} into a "
                                       f"{_what(cat[1])} ({v * 1e6:.0f} µs)")
                return v
        into = [v for k, v in typ.items() if k[0] == rc and _blocking(k[2]) == _blocking(kind)]
        vals = into or [v for k, v in typ.items() if k[0] == rc] or list(typ.values())
        v = _median(vals) if vals else 0.0
        self.assumed.add(say + (f"took the median gap into a {_blocking(kind)} ({v * 1e6:.0f} µs)"
                                if into else f"took the rank's median gap ({v * 1e6:.0f} µs)"
                                if vals else "took 0"))
        return v

    def of(self, st, r: int, p: int, prev: str, kind: str) -> float:
        """The gap in step st (its own value of the measured transition that stands for it)."""
        src = self.source(r, p, prev, kind)
        if not isinstance(src, tuple):
            return src
        return st.gap.get(src, self.typical[src])


class Messages:
    """Seconds per message, per step, until the receive and until the send completes (module
    docstring)."""

    def __init__(self, steps: list, assumed: set):
        self.recv, self.send = _Line(steps, "msg"), _Line(steps, "send")
        self.typical = self.recv.typical
        self.assumed = assumed

    def seconds(self, st, nbytes: float, p: int = 2) -> tuple[float, float]:
        """(receiver's, sender's) seconds of a message of `nbytes` in step st (p: the target's
        ranks; with one there is no message, and nothing to assume). Without sends measured,
        the sender's is the receiver's."""
        if p > 1 and not self.typical:
            self.assumed.add(f"messages: none measured; assumed {ASSUMED_MESSAGE[0] * 1e6:.0f} "
                             f"µs + bytes / {1 / ASSUMED_MESSAGE[1] / 1e9:.0f} GB/s")
        elif p > 1 and len(self.typical) == 1 and nbytes not in self.typical:
            self.assumed.add(f"messages: time proportional to bytes (one size measured, "
                             f"{next(iter(self.typical))} B; predicted {nbytes:.0f} B)")
        r = self.recv.seconds(st.msg, nbytes)
        return r, (self.send.seconds(st.send or {}, nbytes) if self.send.typical else r)


class _Line:
    """c + k·bytes through the median over steps of each size's time (`field` of StepCosts),
    times a step's own times over those medians."""

    def __init__(self, steps: list, field: str):
        per = {}
        for st in steps:
            for b, v in (getattr(st, field) or {}).items():
                per.setdefault(b, []).append(v)
        self.typical = {b: _median(v) for b, v in per.items()}
        self.line = fit(pd.Series({b: self.typical[b] for b in sorted(self.typical)})) \
            if self.typical else ASSUMED_MESSAGE

    def seconds(self, mine: dict, nbytes: float) -> float:
        c, k = self.line
        base = max(0.0, c + k * nbytes)
        have = [b for b in mine if b in self.typical and self.typical[b] > 0]
        if not have:
            return base
        return base * sum(mine[b] for b in have) / sum(self.typical[b] for b in have)
