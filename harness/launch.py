"""Launching runs from Python: one `mpirun -n P python -m harness.run ...` per run.

Used by the lessons script, the sweep runner and the benchmarks — never inside mpirun.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def mpirun() -> str:
    """The mpirun beside this Python (PyPI's mpich installs it into the venv), else on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    found = str(here) if here.exists() else shutil.which("mpirun")
    if not found:
        raise FileNotFoundError("mpirun not found: install the project with its [mpi] extra")
    return found


def command(ranks: int, args: list[str], run_dir: Path) -> list[str]:
    return [mpirun(), "-n", str(ranks), sys.executable, "-m", "harness.run", *args,
            "quiet=true", f"run.dir={run_dir}"]


def launch(ranks: int, args: list[str], run_dir: Path, timeout: float | None = None) -> Path:
    """Run to completion; returns run_dir, raises RuntimeError with the job's stderr if it fails."""
    cmd = command(ranks, args, run_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ),
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return run_dir
