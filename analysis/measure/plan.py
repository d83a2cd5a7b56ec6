"""The planned step: the run's own schedule (schedule.json) replayed through
harness.schedule.simulate with the measured median duration of each rank's actions and the
median measured wire time; the timeline draws it under the measured steps. Its inputs
(`action_totals`, the receives' transfers) are kept a chunk at a time by analysis.stream, so
that a run of any length has its medians."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.measure.waits import recv_split
from harness.schedule import from_json
from harness.schedule.simulate import simulate, to_frame

__all__ = ["planned_frame", "planned_from", "action_totals"]


# the simulator's compute actions; the loss forward belongs to the stage's fwd action, the
# gradient/update statistics to its opt action
_ACTION = {"fwd": "fwd", "loss": "fwd", "bwd": "bwd", "opt": "opt", "norms": "opt"}


def action_totals(events) -> pd.Series:
    """Each action's summed duration per (rank, step, action, microbatch), the Series indexed
    by (rank, action) (one row per action run): what planned_frame takes medians of.

    On plain arrays rather than a groupby of the frame: one integer key per (rank, step, action,
    microbatch), summed with a bincount (over all possible keys while they are not many more
    than the rows, else over the keys present, hashed once by pd.factorize)."""
    codes, kinds = pd.factorize(events["kind"])
    names = np.array(sorted(set(_ACTION.values())))
    act = np.array([names.searchsorted(_ACTION[k]) if k in _ACTION else -1 for k in kinds]
                   + [-1])[codes]   # code -1 (a missing kind) indexes the trailing -1
    use = act >= 0
    cols = [events[c].to_numpy()[use] for c in ("rank", "step")] + [act[use],
                                                                    events["mb"].to_numpy()[use]]
    los = [int(c.min()) if len(c) else 0 for c in cols]
    spans = [int(c.max()) - lo + 1 if len(c) else 1 for c, lo in zip(cols, los)]
    key = np.zeros(use.sum(), np.int64)
    for c, lo, n in zip(cols, los, spans):   # mixed radix: unique per tuple, no overflow for
        key = key * n + (c - lo)             # any run (ranks x steps x 3 x microbatches < 2^63)
    d = np.nan_to_num((events["end"].to_numpy() - events["start"].to_numpy())[use])  # skip NaN
    size = int(np.prod(spans))
    if size <= 4 * len(key) + 4096:
        keys = np.flatnonzero(np.bincount(key, minlength=size))
        total = np.bincount(key, weights=d, minlength=size)[keys]
    else:
        group, keys = pd.factorize(key)
        total = np.bincount(group, weights=d, minlength=len(keys))
    below = spans[1] * spans[2] * spans[3]    # decode each group's rank and action
    rank = keys // below + los[0]
    action = names[(keys // spans[3]) % spans[2] + los[2]]
    return pd.Series(total, index=pd.MultiIndex.from_arrays([rank, action]))


def _median_durations(events) -> pd.Series:
    """Median over (step, microbatch) of each action's summed duration, indexed by (rank,
    action)."""
    t = action_totals(events)
    return t.groupby(level=[0, 1]).median()


def planned_frame(schedule: dict | None, events) -> pd.DataFrame | None:
    """The planned step as a frame (rank, kind, mb, start, end; seconds), or None if the schedule
    or harness.simulate is missing. Durations: per rank and action kind, the median measured
    duration of that action (fwd/bwd summed over layers and loss per microbatch); wire time:
    the median measured receive transfer."""
    if not schedule:
        return None
    rs = recv_split(events)
    latency = float(rs["transfer"].median()) if rs["matched"].any() else 0.0
    return planned_from(schedule, _median_durations(events), latency)


def planned_from(schedule: dict | None, dur: pd.Series, latency: float):
    """planned_frame from its inputs: dur, the median duration per (rank, action); latency,
    the median wire time (s)."""
    if not schedule:
        return None

    def cost(rank, a):
        return float(dur.get((rank, a.kind), 0.0)) if a.kind in ("fwd", "bwd", "opt") else 0.0
    try:
        plan = to_frame(simulate(from_json(schedule), cost, latency))
        plan.attrs["latency"] = latency
        return plan
    except Exception:  # a schedule the simulator refuses: draw no plan rather than fail
        return None
