"""Shared by the benchmarks: launch real runs and read their step times."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path

from harness.ops.launch import launch  # noqa: F401 - re-exported for the benchmarks


def median_step_time(run_dir: Path, skip: int = 1) -> float:
    """Median over steps (the first `skip` are warm-up) of the slowest rank's step time, s."""
    per_step: dict[int, float] = {}
    with open(run_dir / "stats.csv") as f:
        for row in csv.DictReader(f):
            s = int(row["step"])
            per_step[s] = max(per_step.get(s, 0.0), float(row["step_time"]))
    return statistics.median(v for s, v in per_step.items() if s >= skip)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
