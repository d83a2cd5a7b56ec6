"""The classic schedules, one chunk per rank: naive model parallelism, GPipe and 1F1B.

Each generator writes, per rank, the order of its compute actions; `lower` adds the
communication (blocking Send/Recv; 1F1B's steady state exchanges, lower.py). Theory (bubble,
peak in flight) is beside the others in registry.py.
"""
from __future__ import annotations

from .ir import BWD, FWD, Action, Placement, Schedule, check_args
from .lower import lower


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
    check_args(p, m)
    order = [Action(FWD, i) for i in range(m)] + [Action(BWD, j) for j in range(m)]
    return lower([order] * p, Placement(p))


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B / PipeDream-flush (Narayanan et al. 2021), communication as in Megatron-LM.

    Stage s runs w = min(p-s-1, m) warm-up forwards, then m-w rounds of one forward and one
    backward, then w cool-down backwards; it holds at most min(m, p-s) microbatches in flight.
    In the steady state both neighbours have something to send each other at the same moment
    (s its activation, s+1 its gradient). Blocking rendezvous sends would deadlock there, so,
    like Megatron-LM's `send_forward_recv_backward` / `send_backward_recv_forward`, each steady
    exchange posts the receive and the send, then waits for both: every boundary between two
    steady computes is an exchange.
    """
    check_args(p, m)
    orders, exchange = [], []
    for s in range(p):
        w = min(p - s - 1, m)
        steady = [a for k in range(m - w) for a in (Action(FWD, w + k), Action(BWD, k))]
        orders.append([Action(FWD, i) for i in range(w)] + steady
                      + [Action(BWD, j) for j in range(m - w, m)])
        exchange.append(set(range(w, w + len(steady) - 1)))
    return lower(orders, Placement(p), exchange=exchange)
