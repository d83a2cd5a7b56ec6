"""Launching the harness for real in tests: `mpirun -n P python -m harness.run ...`."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from harness.ops.launch import mpirun, torchrun

REPO = Path(__file__).resolve().parent.parent

# A model small enough that a run costs ~import time; threads=1 so that runs with different
# world sizes do bit-identical arithmetic; the set-up's block times taken once per block and
# size (trace.block_repeats: the tests assert nothing that their precision decides, and five
# cost a third of a small run's set-up)
SMALL = ["model.layers=6", "model.width=64", "model.in_features=32", "data.batch_size=32",
         "threads=1", "quiet=true", "trace.block_repeats=1"]


def run_harness(n: int | None, *args: str, timeout: float = 240, cwd=None):
    """Run the harness on n ranks (None: plain `python -m harness.run`, no mpirun)."""
    cmd = [sys.executable, "-m", "harness.run", *args]
    if n is not None:
        cmd = [mpirun(), "-n", str(n), *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO, env=env)


def run_batch(n: int | None, runs: dict[str, list[str]], base: Path, timeout: float = 600,
              torchpipe: bool = False):
    """Several runs in one job (`harness.batch`: one start-up for all): run `name` writes into
    base/name. torchpipe: PyTorch's pipeline under torchrun (runtime=torch added to every run).
    Returns {name: run directory}; a failed batch fails with its output."""
    base.mkdir(parents=True, exist_ok=True)
    spec = base / "batch.json"
    spec.write_text(json.dumps([[*(["runtime=torch"] if torchpipe else []), *args,
                                 f"run.dir={base / str(name)}"] for name, args in runs.items()]))
    cmd = [sys.executable, "-m", "harness.batch", str(spec)]
    if torchpipe:
        cmd = [torchrun(), "--standalone", f"--nproc-per-node={n}", "-m", "harness.batch",
               str(spec)]
    elif n is not None:
        cmd = [mpirun(), "-n", str(n), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    dirs = ok_all(proc)
    assert dirs == [base / str(name) for name in runs], dirs
    return dict(zip(runs, dirs))


_DECLARED: dict[str, dict] = {}   # test module -> {name: (n, args)} (declare_runs)
_DIRS: dict[tuple, Path] = {}      # (test module, name) -> the run's directory
SESSION: dict = {"base": None, "modules": None}   # set by conftest: tmp folder, modules run


def declare_runs(module: str, runs: dict[object, tuple[int | None, list[str]]]) -> None:
    """A test module's successful runs, declared when it is imported: name -> (n ranks, or
    None for one process without mpirun; the harness's arguments). Batches(module) runs them."""
    _DECLARED[module] = runs


class Batches:
    """The runs a module declared (declare_runs): `batches[name]` is its run directory. The
    first time a run on n ranks is asked for, the n-rank runs of every module this session
    runs (conftest.py) are made in one harness.batch job, so that the session pays one
    start-up per world size, not one per module and world size."""

    def __init__(self, module: str):
        self.module = module

    def __getitem__(self, name) -> Path:
        key = (self.module, name)
        if key not in _DIRS:
            n = _DECLARED[self.module][name][0]
            wanted = SESSION["modules"]
            todo = [(m, k, args) for m, runs in _DECLARED.items()
                    if wanted is None or m in wanted or m == self.module
                    for k, (w, args) in runs.items() if w == n and (m, k) not in _DIRS]
            base = SESSION["base"] or Path(tempfile.mkdtemp(prefix="batches-"))
            dirs = run_batch(n, {f"{m}.{k}": args for m, k, args in todo},
                             base / f"n{n or 1}-{len(_DIRS)}")
            _DIRS.update({(m, k): dirs[f"{m}.{k}"] for m, k, _ in todo})
        return _DIRS[key]


def run_torch(n: int, *args: str, timeout: float = 240):
    """PyTorch's pipeline on n ranks as its users start it: `torchrun --nproc-per-node n -m
    harness.run runtime=torch ...` (harness.torchpipe)."""
    cmd = [torchrun(), "--standalone", f"--nproc-per-node={n}", "-m", "harness.run",
           "runtime=torch", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


def trace_frame(run_dir, kind: str, rank: int):
    """A rank's trace file (either format) as pandas.read_csv read the CSV ones: local int ns,
    text as str, an empty integer as NaN. The file as written, without the analysis's
    alignment or sorting."""
    from analysis.read.load import read_table
    from harness import runformat as F
    p = Path(run_dir) / F.trace_file(kind, rank)
    if not p.exists():
        p = Path(run_dir) / F.trace_file(kind, rank, 1)
    t = read_table(p, kind, [])
    return t.to_pandas().astype({c: object for c in t.column_names
                                 if str(t.schema.field(c).type).startswith("dictionary")})


def ok(proc) -> Path:
    """Assert a run succeeded; return its run directory (the last line it printed)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return Path(proc.stdout.strip().splitlines()[-1])


def ok_all(proc) -> list[Path]:
    """Assert a batch succeeded; return the run directories it printed, in order."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return [Path(line) for line in proc.stdout.split("\n") if line.startswith("/")]


def meta(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "meta.json").read_text())


def losses(run_dir: Path) -> list[float]:
    """The last stage's loss per step, from stats.csv."""
    with open(Path(run_dir) / "stats.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def weights(run_dir: Path, world: int) -> dict:
    """Final weights of all stages (run.save_weights=true), keyed by global layer index."""
    out = {}
    for r in range(world):
        out.update(torch.load(Path(run_dir) / "ranks" / f"weights.r{r}.pt", weights_only=True))
    return out


def render(fig, min_width: int = 200):
    """Draw a figure on its canvas, close it, check it is a real picture; return the pixels
    (RGB in 0..1). One draw at the figure's dpi: what savefig draws, without its tight crop's
    second draw and the encoding at 300 dpi (3x the time); the CLIs' tests save for real."""
    import matplotlib.pyplot as plt
    import numpy as np
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba(), dtype=float)[..., :3] / 255
    plt.close(fig)
    assert img.shape[0] > 100 and img.shape[1] > min_width
    assert img.std() > 0.05          # not a blank canvas
    return img


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A file system of `size` mounted at `path` for the duration (root only, else skip)."""
    import pytest
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> None:
    """Write zeros into `path`/filler until the file system is full."""
    with open(path / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def hand_bubble(s: str, p: int, m: int, v: int = 1, times: dict | None = None) -> float:
    """docs/schedules.md's bubble formulas written out again (not harness.schedule.bubble), so
    that a test comparing the two checks the code: idle share of a rank's step. times: one
    chunk's {fwd, bwd_in, bwd_w} per microbatch (default equal)."""
    t = {"fwd": 1.0, "bwd_in": 1.0, "bwd_w": 1.0, **(times or {})}
    f, b, w = t["fwd"], t["bwd_in"], t["bwd_w"]
    if s == "naive":
        return (p - 1) / p
    if s in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if s == "interleaved":                       # Narayanan et al.: (1/v)(p-1)/m of compute
        return (p - 1) / (v * m + p - 1)
    if s == "zb_h1":                             # Qi et al.: (p-1)(F+B-W), W fills <= an F gap
        idle = (p - 1) * (f + b - min(w, f))
        return idle / (idle + m * (f + b + w))
    if s == "zbv":                               # PyTorch's ZB-V order, f = b = w
        idle = max(p - 1, 2 * (2 * p - 1 - m)) * f
        return idle / (idle + 2 * m * (f + b + w))
    if s == "dualpipev":                         # F&B pairs in sequence, f = b = w, m >= 2p
        return (p - 1) * f / ((p - 1) * f + 2 * m * (f + b + w))
    raise KeyError(s)
