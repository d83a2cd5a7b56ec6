"""Shared by the benchmarks: launch real runs and read their step times."""
from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path


def mpirun() -> str:
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else "mpirun"


def launch(n: int, args: list[str], run_dir: Path) -> Path:
    """One `mpirun -n n python -m harness.run ...` into run_dir; raises with its stderr on failure."""
    cmd = [mpirun(), "-n", str(n), sys.executable, "-m", "harness.run", *args, "quiet=true",
           f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return run_dir


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
