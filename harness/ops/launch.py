"""Launching runs from Python: one `mpirun -n P python -m harness.run ...` per run (or, for
`runtime=torch`, `torchrun --nproc-per-node P -m harness.run ...`).

Used by the lessons script, the sweep runner and the benchmarks — never inside mpirun.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil


def _beside_python(name: str, hint: str) -> str:
    """The program `name` beside this Python (installed into the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: {hint}")
    return found


def mpirun() -> str:
    """The mpirun beside this Python (PyPI's mpich installs it into the venv), else on PATH."""
    return _beside_python("mpirun", "install the project with its [mpi] extra")


def torchrun() -> str:
    """The torchrun beside this Python (torch installs it), else on PATH."""
    return _beside_python("torchrun", "it comes with torch")


def command(ranks: int, args: list[str], run_dir: Path) -> list[str]:
    """mpirun for our executor; torchrun for `runtime=torch` (PyTorch's pipeline), with a
    rendezvous of its own on a free port (--standalone), so that two jobs never collide."""
    if "runtime=torch" in args:
        return [torchrun(), "--standalone", f"--nproc-per-node={ranks}", "-m", "harness.run",
                *args, "quiet=true", f"run.dir={run_dir}"]
    return [mpirun(), "-n", str(ranks), sys.executable, "-m", "harness.run", *args,
            "quiet=true", f"run.dir={run_dir}"]


def launch(ranks: int, args: list[str], run_dir: Path, timeout: float | None = None) -> Path:
    """Run to completion; returns run_dir, raises RuntimeError with the job's stderr if it fails.

    The job dies with its launcher: mpirun gets SIGTERM if this process dies (Linux's
    parent-death signal, even on SIGKILL) or is interrupted, or the timeout passes; mpirun
    forwards it to the ranks, which record "terminated by SIGTERM" and abort."""
    cmd = command(ranks, args, run_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ), start_new_session=True,
                            preexec_fn=_die_with_parent)
    try:
        _, err = proc.communicate(timeout=timeout)
    except BaseException:  # timeout, Ctrl-C, the sweep runner's SIGTERM: the job goes too
        stop(proc)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[cmd.index('-m') - 1:])} failed (exit "
                           f"{proc.returncode}):\n"
                           f"{err[-3000:]}")
    return run_dir


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to mpirun (forwarded to the ranks, which record it), then SIGKILL to all."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    proc.terminate()
    try:
        proc.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        for p in family:  # hydra starts each rank in a session of its own
            try:
                p.kill()
            except psutil.Error:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    psutil.wait_procs(family, timeout=grace_s)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the job may outlive a killed launcher
        pass
