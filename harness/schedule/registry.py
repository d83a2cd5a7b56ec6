"""Every schedule with its theory, in one table: `REGISTRY[name]` is its generator, the chunks
per rank it takes, and its closed forms (bubble, peak in flight) with their source.

`build(name, p, m, overlap, virtual)` is how everything gets a schedule (config validation, the
run, the what-if, the synthetic runs); `bubble` and `theory` are the numbers the analysis,
reports and figures compare measurements against. Times f, b, w are one chunk's forward,
input-gradient and weight-gradient times of one microbatch (b + w = a full backward); the
classic schedules' bubbles assume equal per-stage times and free communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .classic import gpipe, naive, one_f_one_b
from .interleaved import interleaved, warmup
from .ir import Schedule
from .lower import overlapped
from .memory import in_flight
from .zero_bubble import dualpipev, zb_h1, zbv

UNIT_TIMES = {"fwd": 1.0, "bwd_in": 1.0, "bwd_w": 1.0}


def _share(bubble_time, busy):
    """Idle share of a rank's step: bubble / (bubble + compute)."""
    return bubble_time / (bubble_time + busy) if bubble_time + busy else 0.0


@dataclass(frozen=True)
class Entry:
    """One schedule: its generator and closed forms (p ranks, m microbatches, v chunks per rank;
    times per chunk and microbatch {fwd, bwd_in, bwd_w}, a full backward being bwd_in+bwd_w).
    chunked: the generator takes v (and checks it); else the schedule holds one chunk per rank
    and its communication is blocking unless pipeline.overlap."""
    build: Callable
    chunked: bool
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


_FILL_DRAIN = "(p-1)/(m+p-1)"
REGISTRY = {
    "naive": Entry(
        naive, False, "(p-1)/p", "1",
        "model parallelism without microbatches: one stage computes at a time",
        lambda p, m, v, f, b, w: (p - 1) / p,
        lambda p, m, v, r: 1,
        ),
    "gpipe": Entry(
        gpipe, False, _FILL_DRAIN, "m",
        "Huang et al. 2019 (GPipe)",
        lambda p, m, v, f, b, w: (p - 1) / (m + p - 1),
        lambda p, m, v, r: m,
        ),
    "1f1b": Entry(
        one_f_one_b, False, _FILL_DRAIN, "min(m, p-r)",
        "Narayanan et al. 2021 (PipeDream-flush); Megatron-LM's communication",
        lambda p, m, v, f, b, w: (p - 1) / (m + p - 1),
        lambda p, m, v, r: min(m, p - r),
        ),
    "interleaved": Entry(
        interleaved, True,
        "(p-1)/(v·m+p-1)  [bubble/compute (1/v)·(p-1)/m]",
        "min(m·v, 2(p-r-1) + (v-1)p + 1)",
        "Narayanan et al. 2021 (SC'21), Sec. 2.2; Megatron-LM's warm-up counts",
        # each chunk is 1/v of a stage: the fill and drain shrink to (p-1)(f+b+w) chunk-times
        # against v·m(f+b+w) of work (bubble/compute = (1/v)(p-1)/m)
        lambda p, m, v, f, b, w: _share((p - 1) * (f + b + w), v * m * (f + b + w)),
        lambda p, m, v, r: min(m * v, warmup(p, m, v, r) + 1),
        ),
    "zb_h1": Entry(
        zb_h1, True,
        "(p-1)(f+b-min(w,f)) / ((p-1)(f+b-min(w,f)) + m(f+b+w))",
        "min(m, p)",
        "Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024, Sec. 3.1 (ZB-H1)",
        # the paper's (p-1)(T_F+T_B-T_W) assumes T_W <= T_F: a W fills at most a forward's gap
        lambda p, m, v, f, b, w: _share((p - 1) * (f + b - min(w, f)), m * (f + b + w)),
        lambda p, m, v, r: min(m, p),
        ),
    "zbv": Entry(
        zbv, True,
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
    "dualpipev": Entry(
        dualpipev, True,
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
# name -> generator, and name -> bubble formula as text (the reports' and figures' labels)
SCHEDULES = {name: e.build for name, e in REGISTRY.items()}
BUBBLE_FORMULA = {name: e.bubble_formula for name, e in REGISTRY.items()}


def build(name: str, p: int, m: int, overlap: bool = False, virtual: int = 1) -> Schedule:
    """The action lists of schedule `name` for p ranks, m microbatches and `virtual` chunks per
    rank (pipeline.virtual; naive, gpipe, 1f1b and zb_h1 take 1, interleaved >= 2, zbv and
    dualpipev 2), as one Schedule that knows its name, microbatches, overlap and placement."""
    if name not in REGISTRY:
        raise ValueError(f"schedule={name!r}: allowed {', '.join(REGISTRY)}")
    e = REGISTRY[name]
    if e.chunked:
        sched = e.build(p, m, virtual)             # always non-blocking (lower.py)
    elif virtual != 1:
        raise ValueError(f"pipeline.virtual={virtual!r}: schedule={name!r} holds one chunk per "
                         f"rank (virtual stages: schedule=interleaved, zbv or dualpipev)")
    else:
        sched = overlapped(e.build(p, m)) if overlap else e.build(p, m)
    return Schedule(sched, sched.placement, name, m, overlap)


def bubble(name: str, p: int, m: int, virtual: int = 1, times=None) -> float | None:
    """Theoretical bubble (idle share of each rank's step) of schedule `name`; None if unknown.
    times: per-chunk {fwd, bwd_in, bwd_w} for the split-backward schedules (default 1, 1, 1;
    the classic schedules' formulas do not depend on them)."""
    return REGISTRY[name].bubble(p, m, virtual, times) if name in REGISTRY else None


def theory(name: str, p: int, m: int, virtual: int = 1) -> dict:
    """Numbers the analysis compares measurements against, for equal per-stage fwd and bwd times.

    bubble: idle share of each rank's step. Naive: (p-1)/p. GPipe (Huang et al. 2019) and
      1F1B (Narayanan et al. 2021, PipeDream-flush): (p-1)/(m+p-1).
    peak_in_flight: per stage, the most microbatches whose activations it holds at once, walked
      from the schedule itself (closed forms: naive 1, gpipe m, 1f1b min(m, p-s)).
    messages: point-to-point messages per step, one activation and one gradient per boundary
      between two ranks and microbatch: 2·(p-1)·m with one chunk per rank.
    The split-backward and virtual-stage schedules count chunk-microbatches in flight, from fwd
    to the bwd_w (or bwd) that releases them.
    """
    sched = build(name, p, m, virtual=virtual)
    pl = sched.placement
    local = sum(pl.where(g)[0] == pl.where(g + 1)[0] for g in range(pl.stages - 1))
    return {"bubble": bubble(name, p, m, virtual),
            "peak_in_flight": [max(in_flight(acts)) for acts in sched],
            "messages": 2 * (pl.stages - 1 - local) * m}
