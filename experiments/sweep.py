"""Sweeps: declare the points, run one mpirun per point, keep an index; re-running resumes.

    python -m experiments.sweep experiments/paper.yaml [--out DIR] [--dry-run]

A sweep file is YAML with a top-level `sweep:` key (docs/figures.md has the full form):

    sweep:
      name: paper                  # a resumed sweep directory must hold a sweep of this name
      base: deep_mlp               # experiment of every point (exp=); a point may set exp
      repeats: 3                   # runs per point, so figures carry spread
      ranks: [2, 3]                # world sizes (crossed with the grid)
      grid: {schedule: [naive, gpipe, 1f1b], pipeline.microbatches: [1, 2, 4, 8]}
      fixed: {model.width: 512, train.steps: 6}          # under every point
      constraints:                 # points matching `when` but not `require` are skipped
        - {when: {schedule: [gpipe, 1f1b]}, require: {pipeline.microbatches: [2, 4, 8]},
           reason: "m=1 is the naive schedule"}
      points:                      # explicit extra points: ranks, tag, repeats, exp, key: value
        - {tag: overlap, ranks: 2, schedule: gpipe, pipeline.microbatches: 4,
           pipeline.overlap: true}

Every point gets an id from its parameters (ranks, exp, every override), so a grown sweep file
keeps the runs of unchanged points. Runs go to DIR/runs/<id>-r<repeat>; DIR/sweep.csv is the
index (one row per run, or per skipped point), rewritten atomically after every run. A run is
complete iff its meta.json says so; complete runs are never launched again or touched, failed
ones are retried with the old directory renamed <dir>-failed-<n> (the harness never overwrites
a run directory, and a failure is evidence worth keeping). Points the harness would refuse
(e.g. naive with m > 1) are skipped with its one-line reason instead of failing.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.config import cores_available
from harness.ops.rundir import write_atomic, write_json

INDEX = "sweep.csv"
_SPECIAL = ("ranks", "tag", "repeats")  # point fields that are not config overrides (nor exp)


@dataclass(frozen=True)
class Point:
    """One configuration of the sweep, run `repeats` times."""
    ranks: int
    exp: str
    overrides: tuple            # ((dotted key, value), ...) sorted by key: fixed, then point
    repeats: int
    tag: str = "grid"           # which part of the sweep declared it ("grid" or the point's tag)
    skip: str | None = None     # reason the point is not run (constraint or config error)
    id: str = field(default="", compare=False)
    base: str = field(default="", compare=False)  # the sweep's base experiment

    def args(self) -> list[str]:
        """Command-line arguments of harness.run (launch adds run.dir and quiet)."""
        return [f"exp={self.exp}"] + [f"{k}={_fmt(v)}" for k, v in self.overrides]

    @property
    def params(self) -> dict:
        return dict(self.overrides)

    def label(self) -> str:
        """Short human form for the progress line: p=2 1f1b m=4 overlap."""
        p = self.params
        bits = [f"[{self.tag}]"] if self.tag != "grid" else []
        bits += [f"p={self.ranks}"] + ([self.exp] if self.exp != self.base else [])
        bits += [str(p["schedule"])] if "schedule" in p else []
        bits += [f"m={p['pipeline.microbatches']}"] if "pipeline.microbatches" in p else []
        bits += ["overlap"] if p.get("pipeline.overlap") else []
        return " ".join(bits)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def point_id(ranks: int, exp: str, overrides, base: str = "") -> str:
    """Stable id: a readable slug plus a hash of everything that determines the run (the
    slug names exp only when it is not the sweep's base; the hash always includes it)."""
    canon = json.dumps({"ranks": ranks, "exp": exp, "overrides": sorted(overrides)},
                       sort_keys=True, default=str)
    h = hashlib.sha1(canon.encode()).hexdigest()[:8]
    p = dict(overrides)
    slug = [f"p{ranks}", exp if exp != base else "", str(p.get("schedule", "")),
            f"m{p['pipeline.microbatches']}" if "pipeline.microbatches" in p else "",
            "ov" if p.get("pipeline.overlap") else ""]
    return re.sub(r"[^A-Za-z0-9_.]+", "-", "-".join(s for s in slug if s)) + "-" + h


def _matches(params: dict, cond: dict) -> bool:
    """Every key of cond holds one of its allowed values (a scalar = one value)."""
    return all(params.get(k) in (v if isinstance(v, list) else [v]) for k, v in cond.items())


def expand(spec: dict) -> list[Point]:
    """The sweep's points, in a fixed order: grid (ranks outermost, then grid keys in file
    order), then explicit points. Pure: no config is loaded here (see `check`)."""
    s = spec["sweep"] if "sweep" in spec else spec
    base, repeats = s.get("base", "deep_mlp"), int(s.get("repeats", 3))
    fixed = dict(s.get("fixed") or {})
    if "run.dir" in fixed:
        raise ValueError("sweep.fixed: run.dir is chosen by the runner (DIR/runs/<id>-r<k>)")
    grid = dict(s.get("grid") or {})
    combos = [{}]
    for k, vals in grid.items():
        combos = [{**c, k: v} for c in combos for v in (vals if isinstance(vals, list) else [vals])]
    raw = [(dict(c), r, "grid", repeats) for r in s.get("ranks", [2]) for c in combos]
    for q in s.get("points") or []:
        q = dict(q)
        raw.append(({k: v for k, v in q.items() if k not in _SPECIAL}, int(q.get("ranks", 2)),
                    str(q.get("tag", "point")), int(q.get("repeats", repeats))))
    out = []
    for params, ranks, tag, reps in raw:
        exp = str(params.pop("exp", base))
        ov = tuple(sorted({**fixed, **params}.items()))
        full = {**dict(ov), "ranks": ranks, "exp": exp}
        skip = next((c.get("reason", f"constraint {c}") for c in s.get("constraints") or []
                     if _matches(full, c.get("when", {}))
                     and not _matches(full, c.get("require", {}))), None)
        out.append(Point(ranks, exp, ov, reps, tag, skip, point_id(ranks, exp, ov, base), base))
    seen = {}
    for p in out:  # the same parameters twice would share run directories
        if p.id in seen:
            raise ValueError(f"sweep declares the point {p.label()} ({p.id}) twice")
        seen[p.id] = p
    return out


def check(point: Point) -> Point:
    """Skip, with the harness's own one-line reason, a point its config validation refuses."""
    if point.skip:
        return point
    from harness import config
    try:
        config.load(point.args(), world_size=point.ranks)
    except config.ConfigError as e:
        return dataclasses.replace(point, skip=f"invalid: {e}")
    return point


def load_spec(path) -> dict:
    from omegaconf import OmegaConf

    from harness.config import read_yaml
    y = OmegaConf.to_container(read_yaml(path), resolve=True)
    if not isinstance(y, dict) or "sweep" not in y:
        raise ValueError(f"{path}: not a sweep file (no top-level 'sweep:' key)")
    return y


def status_of(run_dir: Path) -> str:
    """complete | failed | running | died | missing, from the run's meta.json (the harness's
    word), where "running" whose processes are gone (harness.ops.heartbeat) is "died"."""
    from harness.ops.heartbeat import judge
    try:
        meta = json.loads((run_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "missing" if not run_dir.exists() else "failed"
    return "died" if judge(run_dir, meta) else meta.get("status", "unknown")


def meta_error(run_dir: Path) -> str:
    """The failure meta.json records (or the heartbeats tell), one line; "" if none."""
    from harness.ops.heartbeat import judge
    try:
        meta = json.loads((run_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    died = judge(run_dir, meta)
    if died:
        return died
    err = meta.get("error") or {}
    if meta.get("nonfinite"):
        nf = meta["nonfinite"]
        return f"non-finite {nf['what']} from step {nf['step']} on rank {nf['rank']}"
    return f"{err.get('type')}: {err.get('message')}" if err else ""


@contextlib.contextmanager
def exclusive(out: Path):
    """One runner per sweep directory (flock on it; released if the runner dies), so that no
    point runs twice and no runner moves aside a run another one is running."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: {out} is being run by another sweep runner; "
                             f"wait for it or choose another --out") from None
        yield
    finally:
        os.close(fd)


def error_line(text: str) -> str:
    """The most telling line of a failed job's stderr: the last error-looking one, else the last."""
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    errs = [l for l in lines if re.search(r"Error|Exception|error:|timed out", l)
            and "MPI_Abort" not in l]  # MPICH's abort notice follows the real error
    return (errs or lines or ["(no message)"])[-1][:300]



def _aside(run_dir: Path) -> Path:
    n = 1
    while (dest := run_dir.with_name(f"{run_dir.name}-failed-{n}")).exists():
        n += 1
    os.replace(run_dir, dest)
    return dest


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).convert_dtypes()  # ints stay ints beside NA (skipped rows)


def write_index(rows: list[dict], out: Path) -> None:
    """sweep.csv, atomically: a reader sees the previous index or the new one, never half."""
    write_atomic(out / INDEX, frame(rows).to_csv(index=False))


def _row(p: Point, repeat, run_dir, status, message, seconds, ncores, keys) -> dict:
    return {"point": p.id, "repeat": repeat, "tag": p.tag, "ranks": p.ranks, "exp": p.exp,
            **{k: p.params.get(k) for k in keys}, "run_dir": run_dir, "status": status,
            "message": message, "oversubscribed": p.ranks > ncores, "cores": ncores,
            "seconds": seconds}


def run_sweep(spec: dict, out, launcher=None, ncores: int | None = None, log=None,
              timeout: float | None = None) -> pd.DataFrame:
    """Run every point not yet complete into `out`; returns the index (also sweep.csv).

    `launcher(ranks, args, run_dir, timeout)` runs one job and raises on failure (default
    harness.ops.launch.launch: one mpirun, never a sweep inside mpirun); tests inject a fake."""
    if launcher is None:
        from harness.ops.launch import launch as launcher
    out = Path(out)
    log = log or (lambda s, end="\n": print(s, end=end, file=sys.stderr, flush=True))
    ncores = ncores or cores_available()
    name = spec["sweep"].get("name", "sweep")
    stored = out / "sweep.json"
    if stored.exists():
        old = json.loads(stored.read_text()).get("sweep", {}).get("name", "sweep")
        if old != name:
            raise SystemExit(f"error: {out} holds sweep {old!r}, not {name!r}; "
                             f"choose another --out")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        return _run_locked(spec, out, launcher, ncores, log, timeout)


def _run_locked(spec, out, launcher, ncores, log, timeout):
    stored = out / "sweep.json"
    write_json(stored, spec)
    points = [check(p) for p in expand(spec)]
    keys = sorted({k for p in points for k, _ in p.overrides})
    timeout = timeout or float(spec["sweep"].get("timeout_s", 900))
    before = {}  # a kept run keeps the launch time the previous index recorded for it
    if (out / INDEX).exists():
        old = pd.read_csv(out / INDEX)
        before = {(p, int(k)): s for p, k, s in zip(old["point"], old["repeat"], old["seconds"])
                  if pd.notna(k) and pd.notna(s)}
    rows, at = [], {}
    for p in points:
        if p.skip:
            # an explicit point the harness refuses is a mistake in the sweep file, not a
            # combination of the grid that does not exist: it is "invalid", and fails the sweep
            st = "invalid" if p.tag != "grid" and p.skip.startswith("invalid:") else "skipped"
            rows.append(_row(p, None, None, st, p.skip, None, ncores, keys))
            log(f"[{'  skip' if st == 'skipped' else 'INVALID'}] {p.label()}: {p.skip}")
            continue
        for k in range(p.repeats):
            now = status_of(out / "runs" / f"{p.id}-r{k}")
            done = now in ("complete", "running")  # a live run is left alone, never run twice
            at[(p.id, k)] = len(rows)
            rows.append(_row(p, k, f"runs/{p.id}-r{k}", now if done else "pending",
                             "its processes are still alive" if now == "running" else "",
                             before.get((p.id, k)) if now == "complete" else None, ncores,
                             keys))
    write_index(rows, out)
    # repeat-major order: a passing disturbance (another job on the machine) then hits one
    # repeat of many points, which the median over repeats absorbs, not every repeat of one
    todo = [(p, k) for k in range(max([p.repeats for p in points] or [0]))
            for p in points if not p.skip and k < p.repeats
            and rows[at[(p.id, k)]]["status"] not in ("complete", "running")]
    kept = sum(r["status"] == "complete" for r in rows)
    if kept:
        log(f"{kept} complete runs kept (resumed {out})")
    w = len(str(len(todo)))
    for n, (p, k) in enumerate(todo, 1):
        row = rows[at[(p.id, k)]]
        run_dir = out / row["run_dir"]
        head = f"[{n:>{w}}/{len(todo)}] {p.label()} r{k}"
        if run_dir.exists():
            moved = _aside(run_dir)
            log(f"{head}: previous attempt moved to {moved.name}")
        log(f"{head}" + (f" (oversubscribed: {p.ranks} ranks on {ncores} cores)"
                         if p.ranks > ncores else "") + " ...", end="")
        t0 = time.perf_counter()
        try:
            launcher(p.ranks, p.args(), run_dir, timeout)
            st = status_of(run_dir)
            msg = meta_error(run_dir) if st == "complete" else \
                f"job ended but meta.json says {st!r}"
        except subprocess.TimeoutExpired:
            st, msg = "failed", f"timed out after {timeout:g} s"
        except Exception as e:  # noqa: BLE001 - record it, go on with the other points
            st, msg = "failed", meta_error(run_dir) or error_line(str(e))
        st = "complete" if st == "complete" else "failed"
        secs = round(time.perf_counter() - t0, 2)
        row.update(status=st, message=msg, seconds=secs)
        write_index(rows, out)
        log(f" {secs:.1f} s" + ("" if st == "complete" else f" FAILED: {msg}"))
    write_index(rows, out)
    return frame(rows)


def summary(index: pd.DataFrame) -> str:
    c = index["status"].value_counts()
    return ", ".join(f"{int(c[s])} {s}" for s in ("complete", "failed", "invalid", "running",
                                                  "skipped", "pending") if s in c)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.sweep",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="sweep file (YAML with a top-level sweep: key)")
    ap.add_argument("--out", help="sweep directory (default results/<name>-<timestamp>); "
                    "an existing one of the same sweep is resumed")
    ap.add_argument("--dry-run", action="store_true", help="list the points and exit")
    a = ap.parse_args(argv)
    from harness.config import ConfigError
    try:
        spec = load_spec(a.sweep)
        expand(spec)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):  # end like Ctrl-C: the running job is stopped
        signal.signal(sig, _interrupted)
    if a.dry_run:
        for p in (check(p) for p in expand(spec)):
            print(f"{p.id:<40} x{p.repeats} {p.tag:<8} " + (f"SKIP {p.skip}" if p.skip
                                                             else " ".join(p.args())))
        return 0
    out = Path(a.out or f"results/{spec['sweep'].get('name', 'sweep')}-"
               f"{time.strftime('%Y%m%d-%H%M%S')}")
    index = run_sweep(spec, out)
    print(f"{summary(index)}; index {out / INDEX}", file=sys.stderr)
    print(out)
    return 1 if index["status"].isin(["failed", "invalid", "running"]).any() else 0


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"sweep runner got {signal.Signals(signum).name}")


if __name__ == "__main__":
    raise SystemExit(main())
