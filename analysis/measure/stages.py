"""Which rank holds which stage and model chunk (meta.json's split and schedule placement)."""
from __future__ import annotations

import numpy as np

from harness.schedule import Placement


def placement(meta: dict) -> Placement:
    """The run's harness.schedule.Placement (meta.json's schedule: virtual, placement)."""
    sch = meta.get("schedule") or {}
    return Placement(int(meta.get("world_size") or 1), int(sch.get("virtual") or 1),
                     sch.get("placement") or "loop")


def layer_chunk(meta: dict, layers) -> np.ndarray:
    """The rank's model chunk of each event's layer: meta.json's split gives each global stage
    its layers; the loss (layer = number of blocks) is the last stage's; -1 (opt) is chunk 0."""
    pl = placement(meta)
    layers = np.asarray(layers)
    if pl.v == 1:
        return np.zeros(len(layers), int)
    starts = np.array([lo for lo, _ in meta["split"]])
    g = np.clip(np.searchsorted(starts, layers, "right") - 1, 0, pl.stages - 1)
    return np.where(layers < 0, 0, [pl.where(int(x))[1] for x in g]).astype(int)
