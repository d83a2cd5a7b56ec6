"""Zero-bubble schedules: ZB-H1, ZB-V and DualPipeV, with split backward.

Backward runs as two actions, the input gradient (B, `bwd_in`, sent upstream at once) and the
weight gradient (W, `bwd_w`, later, where it fills a bubble): harness/core/splitgrad.py. Each
generator writes, per rank, the order of its compute actions (the part the papers specify);
`lower` adds the communication the placement implies, always non-blocking (lower.py), so a rank
never blocks except on a tensor it needs and a compute order without a cycle cannot deadlock even
with rendezvous sends, which `harness.schedule.simulate.check` confirms for every generated
schedule (tests/test_schedule_zb.py). Theory (bubble, peak chunk-microbatches in flight per rank)
with its source: registry.py and docs/schedules.md.
"""
from __future__ import annotations

from .ir import BWD, BWD_IN, BWD_W, FWD, Action, Placement, Schedule, check_args, check_virtual
from .lower import lower


# -- ZB-H1 (Qi et al., ICLR 2024, "Zero Bubble Pipeline Parallelism", Sec. 3) ----------------
def zb_h1(p: int, m: int, v: int = 1) -> Schedule:
    """ZB-H1: 1F1B's warm-up (p-r-1 forwards), then r rounds of F, B (weight gradients
    postponed), then F, B, W rounds, then B, W, then the postponed Ws. Every rank holds at most
    min(m, p) microbatches, 1F1B's peak on stage 0; the Ws fill the cool-down bubble."""
    check_args(p, m)
    check_virtual("zb_h1", v, v == 1, "pipeline.virtual=1")
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
    return lower(orders, Placement(p), overlap=True)


# -- ZB-V (Qi et al., ICLR 2024, Sec. 6; the order of torch.distributed.pipelining's
#    ScheduleZBVZeroBubble) ---------------------------------------------------------------
def zbv(p: int, m: int, v: int = 2) -> Schedule:
    """ZB-V: two chunks per rank in a V (rank r holds stages r and 2p-1-r), so rank 0 takes
    both the first and the loss stage. The order is built for max(m, 2p-1) microbatches (what
    fills the V) and the ones past m are dropped, as PyTorch does."""
    check_args(p, m)
    check_virtual("zbv", v, v == 2, "pipeline.virtual=2")
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
    return lower(orders, Placement(p, 2, "v"), overlap=True)


# -- DualPipeV (DeepSeek-V3's DualPipe cut in half; Sea AI Lab, deepseek-ai/DualPipe; the order
#    of torch.distributed.pipelining's ScheduleDualPipeV) -----------------------------------
def dualpipev(p: int, m: int, v: int = 2) -> Schedule:
    """DualPipeV: ZB-V's placement (rank r holds stages r and 2p-1-r) and its eight steps: F0s,
    F0F1 pairs, I1·W·F1 zero-bubble rounds, the main F0B1-F1B0 phase, B1-F1B0, B1B0 (the second
    half with split backward), W0B0, the remaining Ws. Where the papers overlap a forward with
    another microbatch's backward ("F&B", two CUDA streams), this runs the two one after the other,
    forward first, as PyTorch's runtime does without a custom overlap function. Needs m >= 2p."""
    check_args(p, m)
    check_virtual("dualpipev", v, v == 2, "pipeline.virtual=2")
    if m < 2 * p:
        raise ValueError(f"pipeline.microbatches={m}: schedule='dualpipev' needs at least 2p = "
                         f"{2 * p} microbatches (one per stage: its steps assume the V is full)")
    orders = []
    for r in range(p):
        cnt = {(k, c): 0 for k in (FWD, BWD_IN, BWD_W) for c in (0, 1)}
        order, weights = [], []

        def do(kind, c):
            # a full backward counts as its input and weight halves (PyTorch's counters)
            key = BWD_IN if kind == BWD else kind
            order.append(Action(kind, cnt[key, c], c))
            if kind == BWD_IN:
                weights.append((c, cnt[key, c]))
            cnt[key, c] += 1
            if kind == BWD:
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
            do(FWD, 0), do(BWD, 1)
            do(FWD, 1), do(BWD, 0)
        for _ in range(p - r - 1):                           # 5: B1, F1 B0
            do(BWD, 1)
            do(FWD, 1), do(BWD, 0)
        zb = False                                           # 6: B1 B0, split from half-way
        for i in range(r + 1):
            zb |= i == (r + 1) // 2 and r % 2 == 1
            do(BWD_IN if zb else BWD, 1)
            zb |= i == (r + 1) // 2 and r % 2 == 0
            do(BWD_IN if zb else BWD, 0)
        for _ in range(p - r - 1):                           # 7: W B0
            w_pending()
            do(BWD_IN if zb else BWD, 0)
        for _ in range(r + 1):                               # 8: W (the last ones, for m >= 2p)
            w_pending()
        orders.append(order)
    return lower(orders, Placement(p, 2, "v"), overlap=True)
