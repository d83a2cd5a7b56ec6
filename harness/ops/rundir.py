"""The run directory (docs/run-format.md): chosen once by rank 0, never overwriting a run.

Files that could be mistaken for complete (`meta.json`, `config.yaml`, `schedule.json`,
`stats.csv`) are written whole to a temporary name and renamed (atomic on POSIX); the per-rank
logs and stats are append-only and flushed every step.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import json
import os
import time
from pathlib import Path

from ..runformat import FORMAT, RESERVE_GLOB, STATS_COLS, log_file, reserve_file, stats_file


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def choose(exp: str, explicit: str | None) -> tuple[Path, str | None]:
    """Create the run directory (rank 0 only). -> (path, notice or None).

    An explicit `run.dir` that exists and is not empty is refused; the default name
    results/<exp>-<timestamp> gets a -2, -3, ... suffix if taken, and says so.
    """
    if explicit is not None:
        path = Path(explicit)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"run.dir={explicit}: already exists and is not empty; "
                                  f"a run never overwrites another (choose a new run.dir)")
        path.mkdir(parents=True, exist_ok=True)
        return path, None
    base = Path("results") / f"{exp}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()  # atomic: two jobs started in the same second cannot share a directory
            break
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    notice = f"note: {base} exists; this run writes to {path}" if n > 1 else None
    return path, notice


def write_atomic(path: Path, text: str, tag: str = "") -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{tag or os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj, tag: str = "") -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n", tag)


def mark_failed(run_dir: Path, rank: int, exc_type: str, message: str,
                extra: dict | None = None) -> None:
    """Any rank may call this when it is about to abort the job: meta.json says failed.

    Ranks that fail together (a signal reaches them all) take turns under a lock on the run
    directory, so that no rank aborts the job while another is half-way through writing."""
    with _dir_lock(run_dir):
        _mark_failed(run_dir, rank, exc_type, message, extra)
    release_all(run_dir)  # the job is coming down: free what this process holds


@contextlib.contextmanager
def _dir_lock(run_dir: Path, timeout_s: float = 10.0):
    """flock on the directory (needs no disk space; released if the holder dies). Waits at most
    timeout_s, then goes on unlocked: recording the failure matters more than the lock."""
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            except OSError:  # a file system without flock
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def _mark_failed(run_dir: Path, rank: int, exc_type: str, message: str,
                 extra: dict | None = None) -> None:
    path = run_dir / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        meta = {"format": FORMAT}
    if meta.get("status") in ("failed", "complete"):  # the first failure is the cause; keep it
        return
    meta.update(status="failed", end_time=now_iso(),
                error={"rank": rank, "type": exc_type, "message": message, **(extra or {})})
    try:
        write_json(path, meta, tag=f"r{rank}")
    except OSError:  # e.g. the disk is full: give back the room reserved for this moment
        release(run_dir, rank)
        write_json(path, meta, tag=f"r{rank}")


RESERVE_BYTES = 256 * 1024  # per rank: several times a meta.json of a large job


def _reserve_path(run_dir: Path, rank: int) -> Path:
    return run_dir / reserve_file(rank)


# reserve path -> the open file that holds its blocks (the path itself no longer exists)
_HELD: dict[str, object] = {}


def reserve(run_dir: Path, rank: int) -> None:
    """Hold RESERVE_BYTES of real disk blocks (written, not sparse) until `release`, so that a
    full disk can still take the final meta.json.

    The file is unlinked as soon as it is written: its blocks belong to the open file alone, so
    a rank that is killed (SIGKILL, the OOM killer) leaves nothing in the run directory; the
    kernel frees them when it closes the process's files. (On NFS the client keeps a hidden
    .nfs* name until then.)"""
    path = _reserve_path(run_dir, rank)
    f = open(path, "wb")  # noqa: SIM115 - held open until release
    try:
        f.write(b"\0" * RESERVE_BYTES)
        f.flush()
        os.fsync(f.fileno())
    except BaseException:  # a full disk already: hold nothing, leave nothing
        with contextlib.suppress(OSError):
            f.close()
        path.unlink(missing_ok=True)
        raise
    path.unlink()
    _HELD[str(path.absolute())] = f


def release(run_dir: Path, rank: int) -> None:
    """Free the reserve of `rank` in `run_dir` (a no-op when this process holds none)."""
    path = _reserve_path(run_dir, rank)
    f = _HELD.pop(str(path.absolute()), None)
    if f is not None:
        f.close()
    path.unlink(missing_ok=True)  # a name left by a rank of an older harness


def release_all(run_dir: Path) -> None:
    """Free every reserve this process holds, and any reserve name left in `run_dir`."""
    for key in list(_HELD):
        _HELD.pop(key).close()
    for p in Path(run_dir).glob(RESERVE_GLOB):
        p.unlink(missing_ok=True)


class RankFiles:
    """A rank's own append-only files: ranks/rank<R>.log and ranks/stats.r<R>.csv."""

    def __init__(self, run_dir: Path, rank: int):
        (run_dir / log_file(rank)).parent.mkdir(exist_ok=True)
        self.log_f = open(run_dir / log_file(rank), "a", encoding="utf-8")  # noqa: SIM115
        self.stats_f = open(run_dir / stats_file(rank), "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.stats = csv.writer(self.stats_f)
        self.stats.writerow(STATS_COLS)
        self.rank = rank

    def log(self, msg: str) -> None:
        self.log_f.write(f"{now_iso()} {msg}\n")
        self.log_f.flush()

    def stat(self, step: int, loss, grad_norm: float, update_norm: float, step_time: float):
        self.stats.writerow((step, self.rank, "" if loss is None else repr(loss),
                             repr(grad_norm), repr(update_norm), f"{step_time:.6f}"))
        self.stats_f.flush()

    def close(self):
        self.stats_f.close()
        self.log_f.close()


def merge_stats(run_dir: Path, world_size: int) -> None:
    """stats.csv = every rank's rows, ordered by (step, rank); written atomically at the end."""
    rows = []
    for r in range(world_size):
        with open(run_dir / stats_file(r), encoding="utf-8", newline="") as f:
            rows += list(csv.reader(f))[1:]
    rows.sort(key=lambda row: (int(row[0]), int(row[1])))
    lines = [",".join(STATS_COLS)] + [",".join(row) for row in rows]
    write_atomic(run_dir / "stats.csv", "\n".join(lines) + "\n")
