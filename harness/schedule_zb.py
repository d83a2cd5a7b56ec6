"""The schedules researchers study today, as data: interleaved 1F1B and zero bubble.

Each generator first writes, per rank, the order of its compute actions (the part the papers
specify), then `with_comm` adds the communication the placement implies. Communication is always
non-blocking here: an `isend_*` right after the compute that produced the tensor (its wait just
before `opt`), and a receive posted early with one buffer per (stream, chunk), waited for right
before its consumer (harness.schedule.overlapped). A rank then never blocks except on a tensor
it needs, so a compute order without a cycle cannot deadlock even with rendezvous sends, which
`harness.simulate.check` confirms for every generated schedule (tests/test_schedule_zb.py).

Theory per schedule (bubble, peak chunk-microbatches in flight per rank), with its source, is in
`Theory` beside each generator and in docs/schedules.md. Times f, b, w are one chunk's forward,
input-gradient and weight-gradient times of one microbatch (b + w = a full backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import schedule as S
from .schedule import BWD_IN, BWD_W, FWD, Action, Placement

UNIT_TIMES = {"fwd": 1.0, "bwd_in": 1.0, "bwd_w": 1.0}


def with_comm(orders: list, pl: Placement) -> S.Schedule:
    """Per rank, its compute order plus the communication `pl` implies, then `opt`."""
    out = []
    last = pl.stages - 1
    for r, order in enumerate(orders):
        acts = []
        for a in order:
            g = pl.stage(r, a.chunk)
            prev_remote = g > 0 and pl.where(g - 1)[0] != r
            next_remote = g < last and pl.where(g + 1)[0] != r
            if a.kind == FWD:
                acts += [Action(S.RECV_ACT, a.mb, a.chunk)] * prev_remote + [a]
                acts += [Action(S.SEND_ACT, a.mb, a.chunk)] * next_remote
            elif a.kind in S.INPUT_GRAD:
                acts += [Action(S.RECV_GRAD, a.mb, a.chunk)] * next_remote + [a]
                acts += [Action(S.SEND_GRAD, a.mb, a.chunk)] * prev_remote
            else:
                acts.append(a)
        out.append(acts + [Action(S.OPT)])
    return S.overlapped(S.Schedule(out, pl))


def _args(name, p, m, v, need_v, m_multiple=False):
    S._check_args(p, m)
    if not need_v(v):
        raise ValueError(f"pipeline.virtual={v!r}: schedule={name!r} needs "
                         f"{ {'interleaved': 'pipeline.virtual >= 2', 'zbv': 'pipeline.virtual=2', 'zb_h1': 'pipeline.virtual=1', 'dualpipev': 'pipeline.virtual=2'}[name] }")
    if m_multiple and m % p:
        # Megatron-LM's order runs microbatches in groups of p through every chunk; a partial
        # group would leave a chunk waiting for a microbatch that never comes.
        raise ValueError(f"pipeline.microbatches={m}: schedule={name!r} needs a multiple of "
                         f"the {p} ranks (microbatches go through the chunks in groups of p)")


# -- interleaved 1F1B (Narayanan et al. 2021, Megatron-LM) ------------------------------------
def interleaved_warmup(p: int, m: int, v: int, r: int) -> int:
    """Megatron-LM's warm-up forwards on rank r: (p-r-1)·2 + (v-1)·p, at most m·v."""
    return min((p - r - 1) * 2 + (v - 1) * p, m * v)


def interleaved(p: int, m: int, v: int = 2) -> S.Schedule:
    """Interleaved 1F1B: rank r holds chunks r, r+p, ... (round-robin); virtual microbatch k
    runs chunk (k mod pv) // p of microbatch (k // pv)·p + k mod p forwards, the chunks in
    reverse backwards; warm-up forwards, then one forward one backward, then cool-down."""
    _args("interleaved", p, m, v, lambda v: v >= 2, m_multiple=True)
    total, orders = m * v, []

    def fwd(k):
        return Action(FWD, (k // (p * v)) * p + k % p, (k % (p * v)) // p)

    def bwd(k):
        return Action(S.BWD, (k // (p * v)) * p + k % p, v - 1 - (k % (p * v)) // p)
    for r in range(p):
        w = interleaved_warmup(p, m, v, r)
        order = [fwd(k) for k in range(w)]
        for k in range(total - w):
            order += [fwd(w + k), bwd(k)]
        order += [bwd(k) for k in range(total - w, total)]
        orders.append(order)
    return with_comm(orders, Placement(p, v))


# -- ZB-H1 (Qi et al., ICLR 2024, "Zero Bubble Pipeline Parallelism", Sec. 3) ----------------
def zb_h1(p: int, m: int, v: int = 1) -> S.Schedule:
    """ZB-H1: 1F1B's warm-up (p-r-1 forwards), then r rounds of F, B (weight gradients
    postponed), then F, B, W rounds, then B, W, then the postponed Ws. Every rank holds at most
    min(m, p) microbatches, 1F1B's peak on stage 0; the Ws fill the cool-down bubble."""
    _args("zb_h1", p, m, v, lambda v: v == 1)
    orders = []
    for r in range(p):
        f = b = w = 0
        order = []

        def step(*kinds):
            nonlocal f, b, w
            for k in kinds:
                i = {FWD: f, BWD_IN: b, BWD_W: w}[k]
                order.append(Action(k, i))
                f, b, w = f + (k == FWD), b + (k == BWD_IN), w + (k == BWD_W)
        for _ in range(min(p - r - 1, m)):
            step(FWD)
        for _ in range(r):
            if f < m:
                step(FWD, BWD_IN)
        while f < m:
            step(FWD, BWD_IN, BWD_W)
        while b < m:
            step(BWD_IN, BWD_W)
        while w < m:
            step(BWD_W)
        orders.append(order)
    return with_comm(orders, Placement(p))


# -- ZB-V (Qi et al., ICLR 2024, Sec. 6; the order of torch.distributed.pipelining's
#    ScheduleZBVZeroBubble) ---------------------------------------------------------------
def zbv(p: int, m: int, v: int = 2) -> S.Schedule:
    """ZB-V: two chunks per rank in a V (rank r holds stages r and 2p-1-r), so rank 0 takes
    both the first and the loss stage. The order is built for max(m, 2p-1) microbatches (what
    fills the V) and the ones past m are dropped, as PyTorch does."""
    _args("zbv", p, m, v, lambda v: v == 2)
    n = max(2 * p - 1, m)
    orders = []
    for r in range(p):
        cnt = {(k, c): 0 for k in (FWD, BWD_IN, BWD_W) for c in (0, 1)}
        order = []

        def do(kind, c):
            order.append(Action(kind, cnt[kind, c], c))
            cnt[kind, c] += 1
        for _ in range(2 * (p - r) - 1):
            do(FWD, 0)
        for _ in range(r):
            do(FWD, 1)
            do(FWD, 0)
        for _ in range(p - r):
            do(FWD, 1), do(BWD_IN, 1), do(BWD_W, 1)
        while cnt[FWD, 1] < cnt[FWD, 0] or cnt[FWD, 0] < n:
            if cnt[FWD, 0] < n:
                do(FWD, 0)
            do(BWD_IN, 0), do(BWD_W, 0)
            do(FWD, 1), do(BWD_IN, 1), do(BWD_W, 1)
        for _ in range(r):                       # cool-down: input gradients first
            do(BWD_IN, 0), do(BWD_IN, 1)
        for _ in range(p - r):
            do(BWD_IN, 0), do(BWD_W, 0)
        for c in (1, 0):                         # then every postponed weight gradient
            while cnt[BWD_W, c] < cnt[BWD_IN, c]:
                do(BWD_W, c)
        orders.append([a for a in order if a.mb < m])
    return with_comm(orders, Placement(p, 2, "v"))


# -- DualPipeV (DeepSeek-V3's DualPipe cut in half; Sea AI Lab, deepseek-ai/DualPipe; the order
#    of torch.distributed.pipelining's ScheduleDualPipeV) -----------------------------------
def dualpipev(p: int, m: int, v: int = 2) -> S.Schedule:
    """DualPipeV: ZB-V's placement (rank r holds stages r and 2p-1-r) and its eight steps: F0s,
    F0F1 pairs, I1·W·F1 zero-bubble rounds, the main F0B1-F1B0 phase, B1-F1B0, B1B0 (the second
    half with split backward), W0B0, the remaining Ws. Where the papers overlap a forward with
    another microbatch's backward ("F&B", two CUDA streams), this runs the two one after the other,
    forward first, as PyTorch's runtime does without a custom overlap function. Needs m >= 2p."""
    _args("dualpipev", p, m, v, lambda v: v == 2)
    if m < 2 * p:
        raise ValueError(f"pipeline.microbatches={m}: schedule='dualpipev' needs at least 2p = "
                         f"{2 * p} microbatches (one per stage: its steps assume the V is full)")
    orders = []
    for r in range(p):
        cnt = {(k, c): 0 for k in (FWD, BWD_IN, BWD_W) for c in (0, 1)}
        order, weights = [], []

        def do(kind, c):
            # a full backward counts as its input and weight halves (PyTorch's counters)
            key = BWD_IN if kind == S.BWD else kind
            order.append(Action(kind, cnt[key, c], c))
            if kind == BWD_IN:
                weights.append((c, cnt[key, c]))
            cnt[key, c] += 1
            if kind == S.BWD:
                cnt[BWD_W, c] += 1

        def w_pending():
            if weights:
                c, mb = weights.pop(0)
                order.append(Action(BWD_W, mb, c))
                cnt[BWD_W, c] += 1
        for _ in range((p - r - 1) * 2):                     # 1: F0
            do(FWD, 0)
        for _ in range(r + 1):                               # 2: F0 F1
            do(FWD, 0), do(FWD, 1)
        for _ in range(p - r - 1):                           # 3: I1 W F1
            do(BWD_IN, 1), w_pending(), do(FWD, 1)
        for _ in range(m - 2 * p + r + 1):                   # 4: F0 B1, F1 B0 ("F&B")
            do(FWD, 0), do(S.BWD, 1)
            do(FWD, 1), do(S.BWD, 0)
        for _ in range(p - r - 1):                           # 5: B1, F1 B0
            do(S.BWD, 1)
            do(FWD, 1), do(S.BWD, 0)
        zb = False                                           # 6: B1 B0, split from half-way
        for i in range(r + 1):
            zb |= i == (r + 1) // 2 and r % 2 == 1
            do(BWD_IN if zb else S.BWD, 1)
            zb |= i == (r + 1) // 2 and r % 2 == 0
            do(BWD_IN if zb else S.BWD, 0)
        for _ in range(p - r - 1):                           # 7: W B0
            w_pending()
            do(BWD_IN if zb else S.BWD, 0)
        for _ in range(r + 1):                               # 8: W (the last ones, for m >= 2p)
            w_pending()
        orders.append(order)
    return with_comm(orders, Placement(p, 2, "v"))


# -- theory ---------------------------------------------------------------------------------
def _share(bubble_time, busy):
    """Idle share of a rank's step: bubble / (bubble + compute)."""
    return bubble_time / (bubble_time + busy) if bubble_time + busy else 0.0


@dataclass(frozen=True)
class Theory:
    """One schedule's generator and closed forms (p ranks, m microbatches, v chunks per rank;
    times per chunk and microbatch {fwd, bwd_in, bwd_w}, a full backward being bwd_in+bwd_w)."""
    build: Callable
    bubble_formula: str
    peak_formula: str
    source: str
    _bubble: Callable                  # (p, m, v, f, b, w) -> idle share
    _peak: Callable                    # (p, m, v, r) -> chunk-microbatches in flight on rank r

    def bubble(self, p, m, v=1, times=None):
        t = {**UNIT_TIMES, **(times or {})}
        return self._bubble(p, m, v, t["fwd"], t["bwd_in"], t["bwd_w"])

    def peak(self, p, m, v=1):
        return [self._peak(p, m, v, r) for r in range(p)]


VIRTUAL = {
    "interleaved": Theory(
        interleaved,
        "(p-1)/(v·m+p-1)  [bubble/compute (1/v)·(p-1)/m]",
        "min(m·v, 2(p-r-1) + (v-1)p + 1)",
        "Narayanan et al. 2021 (SC'21), Sec. 2.2; Megatron-LM's warm-up counts",
        # each chunk is 1/v of a stage: the fill and drain shrink to (p-1)(f+b+w) chunk-times
        # against v·m(f+b+w) of work (bubble/compute = (1/v)(p-1)/m)
        lambda p, m, v, f, b, w: _share((p - 1) * (f + b + w), v * m * (f + b + w)),
        lambda p, m, v, r: min(m * v, interleaved_warmup(p, m, v, r) + 1),
        ),
    "zb_h1": Theory(
        zb_h1,
        "(p-1)(f+b-min(w,f)) / ((p-1)(f+b-min(w,f)) + m(f+b+w))",
        "min(m, p)",
        "Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024, Sec. 3.1 (ZB-H1)",
        # the paper's (p-1)(T_F+T_B-T_W) assumes T_W <= T_F: a W fills at most a forward's gap
        lambda p, m, v, f, b, w: _share((p - 1) * (f + b - min(w, f)), m * (f + b + w)),
        lambda p, m, v, r: min(m, p),
        ),
    "zbv": Theory(
        zbv,
        "k·f / (k·f + 6mf), k = max(p-1, 2(2p-1-m)), for f=b=w (the paper's optimised ZB-V: 0)",
        "min(2p, 2m, m + r + 1)",
        "Qi et al., ICLR 2024, Sec. 6 (ZB-V); PyTorch ScheduleZBVZeroBubble's order",
        # PyTorch's hand-written ZB-V order (reproduced here) leaves (p-1) forward-times idle
        # per rank with equal F/B/W times once m >= 2p-1 microbatches fill the V; with fewer,
        # each missing one below 2p-1 leaves two more: 2(2p-1-m) (simulated for p = 2..7,
        # m = 1..3p: tests/test_schedule_zb.py). The paper's own ZB-V reaches 0 there.
        # Stated for f=b=w only: other times give other drains.
        lambda p, m, v, f, b, w: _share(max(p - 1, 2 * (2 * p - 1 - m)) * f,
                                        2 * m * (f + b + w)),
        # 2p chunk-microbatches = p whole microbatches: 1F1B's peak on stage 0, on every rank
        lambda p, m, v, r: min(2 * p, 2 * m, m + r + 1),
        ),
    "dualpipev": Theory(
        dualpipev,
        "(p-1)f / ((p-1)f + 6mf), for f=b=w, F&B run one after the other "
        "[paper, F&B overlapped: (p-1)(F&B+B-3W)]",
        "2p+1",
        "DeepSeek-V3 (arXiv 2412.19437) DualPipe; DualPipeV in deepseek-ai/DualPipe; "
        "PyTorch ScheduleDualPipeV's order",
        # simulated with equal times and each F&B pair run in sequence: (p-1) forward-times idle
        # per rank (tests/test_schedule_zb.py); the paper's (PP/2-1)(F&B+B-3W), PP = 2p stages,
        # counts an overlapped F&B pair, which one CPU thread per rank cannot do
        lambda p, m, v, f, b, w: _share((p - 1) * f, 2 * m * (f + b + w)),
        # the paper's "PP+1" activations per device: 2p+1 chunk-microbatches (m >= 2p)
        lambda p, m, v, r: 2 * p + 1,
        ),
}
