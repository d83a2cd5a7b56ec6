"""A step's window, and which steps are warm-up: the ground floor every metric stands on.

- compute kinds: the spans that are a rank's computation (runformat.COMPUTE: fwd, bwd, loss,
  opt, norms, bwd_in, bwd_w), the bubble's complement;
- a step's window: first start to last end of the step's compute spans over all ranks
  (FIELD.md's span taken over compute: a receive for step k is posted as soon as its rank
  finishes step k-1, while upstream ranks are still in step k-1, so counting it would make
  consecutive steps overlap);
- steady steps: every complete step but the first (warm-up), unless it is the only one.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.measure import intervals as iv
from harness import runformat

COMPUTE = runformat.COMPUTE  # fwd, bwd, loss, opt, norms (the run's gradient/update statistics)


def step_windows(events: pd.DataFrame) -> pd.DataFrame:
    """Per step: first start and last end of compute over all ranks, and span = end - start.
    Steps with no compute at all (a crashed rank's last step) fall back to all their events."""
    steps, code = iv.factorize(events["step"].to_numpy())
    lo, hi = windows(code, len(steps), events["start"].to_numpy(), events["end"].to_numpy(),
                     events["kind"].isin(COMPUTE).to_numpy())
    w = pd.DataFrame({"start": lo, "end": hi}, index=pd.Index(steps, name="step"))
    w["span"] = w["end"] - w["start"]
    return w


def windows(code, n, start, end, comp):
    """step_windows on arrays: code = each event's step as 0..n-1 (every one has events),
    comp = is it compute -> (start, end) per step. NaN bounds are skipped, as a groupby
    min/max skips them."""
    has_comp = np.zeros(n, bool)
    has_comp[code[comp]] = True
    use = comp | ~has_comp[code]   # compute, or any event of a compute-less step
    lo, hi = np.full(n, np.nan), np.full(n, np.nan)
    np.fmin.at(lo, code[use], start[use])
    np.fmax.at(hi, code[use], end[use])
    return lo, hi


def steady(steps: list) -> tuple[list, list, str]:
    """(warm-up, steady steps, note): the first step is warm-up unless it is the only one."""
    steps = sorted(steps)
    if not steps:
        return [], [], "no complete step"
    if len(steps) == 1:
        return [], steps, f"only one step ({steps[0]}): used as is, warm-up included"
    return steps[:1], steps[1:], f"median over steps {steps[1]}..{steps[-1]}; step {steps[0]} " \
                                 f"is warm-up and excluded"
