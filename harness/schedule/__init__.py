"""Pipeline schedules as data: one package, pure Python (no torch, no MPI).

    ir.py           the IR: Action (kind, microbatch, chunk), Placement, Schedule, schedule.json
    lower.py        a compute order per rank -> the same with its sends and receives
    classic.py      naive, GPipe, 1F1B               (one chunk per rank)
    interleaved.py  interleaved 1F1B                 (v chunks per rank)
    zero_bubble.py  ZB-H1, ZB-V, DualPipeV           (split backward)
    registry.py     every schedule with its theory; build, bubble, theory
    memory.py       in flight and peak bytes, walked from the action lists
    simulate.py     the checker and the planned timeline (import it as harness.schedule.simulate)

The same action lists are run by harness.core.executor, checked by simulate and drawn by the
analysis. Everything a user of schedules needs is importable from here.
"""
from .classic import gpipe, naive, one_f_one_b
from .interleaved import interleaved
from .ir import (BWD, BWD_IN, BWD_W, COMM, COMPUTE, FWD, INPUT_GRAD, IRECV_ACT, IRECV_GRAD,
                 ISEND_ACT, ISEND_GRAD, KIND_OF, KINDS, LETTER, OPT, RECV_ACT, RECV_GRAD,
                 RELEASES, SEND_ACT, SEND_GRAD, WAIT_RECV_ACT, WAIT_RECV_GRAD, WAIT_SEND_ACT,
                 WAIT_SEND_GRAD, Action, Placement, Schedule, from_json, message, peer,
                 placement_of, sending, to_json)
from .lower import lower, overlapped
from .memory import in_flight, peak_bytes, pebble_theory
from .registry import BUBBLE_FORMULA, REGISTRY, SCHEDULES, UNIT_TIMES, bubble, build, theory
from .zero_bubble import dualpipev, zb_h1, zbv

__all__ = [
    "BWD", "BWD_IN", "BWD_W", "COMM", "COMPUTE", "FWD", "INPUT_GRAD", "IRECV_ACT", "IRECV_GRAD",
    "ISEND_ACT", "ISEND_GRAD", "KIND_OF", "KINDS", "LETTER", "OPT", "RECV_ACT", "RECV_GRAD",
    "RELEASES", "SEND_ACT", "SEND_GRAD", "WAIT_RECV_ACT", "WAIT_RECV_GRAD", "WAIT_SEND_ACT",
    "WAIT_SEND_GRAD", "Action", "Placement", "Schedule", "from_json", "message", "peer",
    "placement_of", "sending", "to_json", "lower", "overlapped", "in_flight", "peak_bytes",
    "pebble_theory", "BUBBLE_FORMULA", "REGISTRY", "SCHEDULES", "UNIT_TIMES", "bubble", "build",
    "theory", "gpipe", "naive", "one_f_one_b", "interleaved", "zb_h1", "zbv", "dualpipev",
]
