"""One rank's side of the run directory (docs/run-format.md), from creation to completion.

Rank 0 creates the run directory (harness.ops.rundir.choose) and shares its name; every rank
writes its own files into its base directory (run.local_dir, or the run directory itself): its
log and stats (harness.ops.rundir.RankFiles), its heartbeat, and a disk reserve that lets a full
disk still take the failure. Rank 0 writes config.yaml, schedule.json and meta.json at the start;
at the end every rank's files are complete (and travel to rank 0 over MPI with run.local_dir),
rank 0 merges the stats and marks meta.json complete.
"""
from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path

from .. import config, runformat
from .. import schedule as S
from ..core import comm
from . import localdir, rundir
from .heartbeat import Heartbeat


class Session:
    """The run directory as rank `rank` of `size` sees it. Until `open`: all None. comm: the
    job's collectives (harness.core.comm, or harness.torchpipe.dist.DistComm under torchrun).

    run_path: the run directory's name, known on every rank; run_dir: the same where this rank
    can reach it through the file system (debug.no_shared_fs: rank 0 only, else None); base:
    where this rank writes its own files; bases: every rank's base, as this rank names it."""

    def __init__(self, cfg, rank: int, size: int, comm=comm):
        self.cfg, self.rank, self.size, self.comm = cfg, rank, size, comm
        self.run_path = self.run_dir = self.base = self.bases = None
        self.files = self.heartbeat = self.meta = self.start_time = None

    def open(self) -> bool:
        """Collective: rank 0 creates the run directory, every rank its own files. False (said
        once, by rank 0) when the directory cannot be created."""
        cfg, rank = self.cfg, self.rank
        decision = None
        if rank == 0:
            try:
                path, notice = rundir.choose(cfg.exp, cfg.run.dir)
                decision = (str(path), notice, None)
            except OSError as e:
                decision = (None, None, str(e))
        path, notice, error = self.comm.bcast(decision)
        if error:
            if rank == 0:
                print(f"harness.run: error: {error}", file=sys.stderr, flush=True)
            return False
        self.run_path = Path(path)
        hidden = cfg.debug.no_shared_fs and rank != 0
        self.run_dir = None if hidden else self.run_path
        host = socket.gethostname()
        self.base = localdir.base_dir(cfg.run.local_dir, self.run_path, self.run_path.name, rank,
                                      host)
        # without run.local_dir every rank writes into the run directory rank 0 created: a rank
        # on a host that does not share its file system must say so, not create one of its own
        blind = (rank != 0 and self.run_dir is not None and not cfg.run.local_dir
                 and not sees_dir(self.run_path))
        views = self.comm.allgather((str(self.base), host, blind))
        if any(b for _, _, b in views):
            if rank == 0:
                print(f"harness.run: error: {unreachable(views, self.run_path)}", file=sys.stderr,
                      flush=True)
                if cfg.run.dir is None:  # the default name was made for this run: empty
                    with contextlib.suppress(OSError):
                        self.run_path.rmdir()
            return False
        (self.base / runformat.RANKS_DIR).mkdir(parents=True, exist_ok=True)
        self.bases = [Path(b) for b, _, _ in views]
        self.files = rundir.RankFiles(self.base, rank)
        # room to record a failure even when the disk fills up (rundir.mark_failed frees it)
        rundir.reserve(self.base, rank)
        self.heartbeat = Heartbeat(self.base, rank, cfg.comm.timeout_s)
        if notice and rank == 0:
            print(notice, file=sys.stderr, flush=True)
            self.files.log(notice)
        self.start_time = rundir.now_iso()
        return True

    def start(self, schedule: S.Schedule, stage, info: dict, cuda_aware: bool,
              runtime: dict | None = None) -> None:
        """Collective: every rank's `info` to rank 0, which writes config.yaml, schedule.json
        and meta.json ("running") and warns about oversubscribed hosts. runtime: meta.json's
        "runtime" (which executor ran the schedule; ours by default)."""
        infos = self.comm.gather(info)
        if self.rank == 0:
            d = self.run_dir
            rundir.write_atomic(d / "config.yaml", config.to_yaml(self.cfg))
            rundir.write_json(d / "schedule.json", S.to_json(schedule))
            self.meta = start_meta(self.cfg, schedule, stage, infos, self.start_time, cuda_aware,
                                   self.comm.library(), runtime or {"name": "ours"})
            rundir.write_json(d / "meta.json", self.meta)
            warn_oversubscribed(infos)
        self.comm.barrier()

    def record(self, step: int, out: dict, dt: float) -> None:
        """A finished step: its stats row and the heartbeat."""
        self.files.stat(step, out["loss"], out["grad_norm"], out["update_norm"], dt)
        self.heartbeat.beat(step, dt)

    def say_loss(self, step: int, out: dict, dt: float) -> None:
        """The loss's rank logs (and, unless quiet, prints) one line per step; steps are
        numbered from 0 everywhere."""
        if out["loss"] is None:
            return
        steps = self.cfg.train.steps
        line = (f"step {step:>4}  ({step + 1}/{steps})  loss {out['loss']:.4f}  "
                f"step time {dt * 1e3:.1f} ms")
        self.files.log(line)
        if not self.cfg.quiet:
            print(line, flush=True)

    def complete(self, clock_start, clock_end, nonfinite: list) -> None:
        """Collective: every rank's files complete (and, with run.local_dir, moved to rank 0's
        run directory, checked); rank 0 merges stats.csv and marks meta.json complete with the
        clock estimates and where training went non-finite, if it did."""
        self.files.close()
        self.comm.barrier()  # every rank's files are complete
        if self.cfg.run.local_dir:  # they travel to rank 0's run directory, checked
            out = localdir.gather(self.base, self.run_dir, self.rank, self.size, self.comm)
            if self.rank == 0 and out:
                raise RuntimeError("file transfer to the run directory failed (the files stay "
                                   "in the ranks' run.local_dir): " + "; ".join(out))
        if self.rank == 0:
            rundir.merge_stats(self.run_dir, self.size)
            est = [dict(e, phase="start") for e in clock_start[1:]]
            est += [dict(e, phase="end") for e in clock_end[1:]]
            self.meta.update(status="complete", end_time=rundir.now_iso())
            self.meta["clock"]["estimates"] = est
            if nonfinite:  # kept training past divergence: say where it began
                self.meta["nonfinite"] = min(nonfinite, key=lambda x: (x["step"], x["rank"]))
            rundir.write_json(self.run_dir / "meta.json", self.meta)

    def close(self) -> None:
        """After a complete run: the heartbeat, the disk reserve and, with run.local_dir, the
        scratch directory if nothing is left in it."""
        self.heartbeat.close()
        rundir.release(self.base, self.rank)
        if self.cfg.run.local_dir:
            localdir.tidy(self.base, [])


def start_meta(cfg, schedule: S.Schedule, stage, infos: list, start_time: str,
               cuda_aware: bool, library: str, runtime: dict) -> dict:
    """meta.json at the start of a run (docs/run-format.md): status "running". library: the
    message library's version line; runtime: which executor ran the schedule."""
    pl = schedule.placement
    return {
        "format": runformat.FORMAT, "experiment": cfg.exp, "status": "running", "error": None,
        "world_size": len(schedule), "start_time": start_time, "end_time": None,
        "ranks": infos,
        "model": stage.info,
        "split": [list(b) for b in stage.bounds],
        "schedule": {"name": schedule.name, "microbatches": schedule.microbatches,
                     "virtual": pl.v, "placement": pl.style, "overlap": schedule.overlap,
                     "recv_requires_grad": cfg.pipeline.recv_requires_grad,
                     "detach": cfg.pipeline.detach,
                     "recompute": cfg.pipeline.recompute},
        # per microbatch bytes each stage saves, derived from the code (None: a model without
        # a formula, e.g. a user's factory)
        # (per rank, through all its chunks; peaks walked from the schedule)
        "pebbles_theory": S.pebble_theory(schedule, stage.act_bytes),
        "trace": {"enabled": cfg.trace.enabled, "format": runformat.FORMAT,
                  "per_layer": cfg.trace.per_layer,
                  "sample_interval_ms": cfg.trace.sample_interval_ms},
        "clock": {"method": "ping-pong with rank 0, minimum round trip (Score-P)",
                  "exchanges": cfg.trace.clock_exchanges, "estimates": []},
        "runtime": runtime,
        "versions": versions(), "mpi_library": library, "cuda_aware_mpi": cuda_aware,
        "comm": {"wait": cfg.comm.wait,
                 "poll_us": cfg.comm.poll_us if cfg.comm.wait != "spin" else None,
                 "spin_us": cfg.comm.spin_us if cfg.comm.wait == "backoff" else None},
    }


def sees_dir(path: Path, wait_s: float = 2.0) -> bool:
    """Whether this rank sees the directory rank 0 created. Listing the parent first makes an
    NFS client revalidate its cached view of it; a short wait allows for a slower one."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            os.listdir(path.absolute().parent)
        if path.is_dir():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def unreachable(views: list, run_path: Path) -> str:
    """One line naming the ranks that cannot see the run directory (views: (base, host, blind)
    per rank, rank 0 first)."""
    blind = [(r, h) for r, (_, h, b) in enumerate(views) if b]
    hosts = sorted({h for _, h in blind})
    h0 = views[0][1]
    return (f"rank{'s' if len(blind) > 1 else ''} {', '.join(str(r) for r, _ in blind)} on "
            f"{', '.join(hosts)} cannot write into the run directory {run_path.absolute()} that "
            f"rank 0 created on {h0}: {' and '.join(hosts)} "
            f"{'does' if len(hosts) == 1 else 'do'} not have it (no file system shared with {h0} "
            f"there); set run.local_dir to a directory every host has (e.g. "
            f"run.local_dir=/tmp/$USER), or run.dir on a file system all hosts share")


def warn_oversubscribed(infos: list) -> None:
    """Once per job (rank 0): hosts running more ranks than they have cores."""
    for host in sorted({i["host"] for i in infos}):
        mine = [i for i in infos if i["host"] == host]
        if len(mine) > mine[0]["cores"]:
            print(f"warning: {len(mine)} ranks on {host}, which has {mine[0]['cores']} cores: "
                  f"oversubscribed, so step times are not representative", file=sys.stderr,
                  flush=True)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "mpi4py", "numpy", "omegaconf", "psutil", "nvidia-ml-py", "mpich"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
