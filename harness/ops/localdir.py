"""No shared file system needed: per-rank scratch directories, moved to rank 0 over MPI.

With `run.local_dir` set, each rank writes its own files (logs, stats, heartbeat, traces,
weights) under `<local_dir>/<run name>/` on its own host, with the same relative names they have
in the run directory. At the end of the run (collectively, outside the steps) every rank sends
them to rank 0, which writes them into its run directory and checks each against the size and
SHA-256 the sender computed; a file that arrived whole is then deleted at the sender. The result
is the same run directory as without `run.local_dir`. A rank that died, or a file that failed its
check, keeps its local copy; meta.json names every rank's host and local directory, and the
loader says where the missing files are.

`{rank}` and `{host}` in `run.local_dir` are replaced (the test knob that gives each rank of one
host a directory of its own is `run.local_dir=/tmp/x/{rank}`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .. import runformat

CHUNK = 16 << 20  # bytes per MPI message of a file's content


def base_dir(local_dir: str | None, run_dir: Path, run_name: str, rank: int, host: str) -> Path:
    """Where rank `rank` writes its files: the run directory, or its own scratch directory."""
    if not local_dir:
        return Path(run_dir)
    return Path(local_dir.format(rank=rank, host=host)).absolute() / run_name


def own_files(base: Path, rank: int) -> list[str]:
    """Relative paths of the files under `base` that rank `rank` wrote (runformat's names:
    `<kind>.r<R>.<ext>`, `rank<R>.log`), excluding scratch that has no place in a run directory
    (the disk reserve, the hang report)."""
    mine = runformat.rank_file_pattern(rank)
    out = []
    for sub in runformat.RANK_DIRS:
        d = Path(base) / sub
        if d.is_dir():
            out += [f"{sub}/{p.name}" for p in sorted(d.iterdir()) if p.is_file() and mine.match(p.name)]
    return out


def digest(path: Path) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def receive_file(run_dir: Path, rel: str, size: int, sha: str, chunks) -> str | None:
    """Write the byte chunks of `rel` into run_dir (temporary name, renamed when whole) and check
    them against (size, sha). -> None when good, else what was wrong (nothing is left)."""
    dst = Path(run_dir) / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.transfer.tmp")
    h, n = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                h.update(c)
                f.write(c)
                n += len(c)
        if n != size or h.hexdigest() != sha:
            tmp.unlink(missing_ok=True)
            return (f"{rel}: arrived with {n} bytes, sha256 {h.hexdigest()[:12]}..., expected "
                    f"{size} bytes, sha256 {sha[:12]}...")
        os.replace(tmp, dst)
        return None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_local(base: Path, run_dir: Path, rel: str) -> str | None:
    """Rank 0's own scratch files: copied, and checked like the others."""
    src = Path(base) / rel
    size, sha = digest(src)
    with open(src, "rb") as f:
        return receive_file(run_dir, rel, size, sha, iter(lambda: f.read(CHUNK), b""))


def tidy(base: Path, rels: list[str]) -> None:
    """Delete transferred files, then the directories they leave empty (never anything else)."""
    for rel in rels:
        (Path(base) / rel).unlink(missing_ok=True)
    for p in [Path(base) / d for d in runformat.RANK_DIRS] + [Path(base)]:
        try:
            p.rmdir()  # only if empty
        except OSError:
            pass


def gather(base: Path, run_dir: Path | None, rank: int, size: int, comm) -> list[str]:
    """Collective: every rank's own files go to rank 0's run directory. -> on rank 0, the
    problems (one line each; empty = all arrived whole); on other ranks, the files they kept.

    `comm`: harness.core.comm (send_obj/recv_obj/send_bytes/recv_bytes). Ranks take turns in rank
    order; each file: (rel, size, sha256) first, then its bytes in CHUNK-sized messages."""
    problems = []
    if rank == 0:
        if Path(base) != Path(run_dir):
            rels = own_files(base, 0)
            bad = [p for p in (copy_local(base, run_dir, r) for r in rels) if p]
            problems += [f"rank 0: {p}" for p in bad]
            tidy(base, [r for r in rels if not any(p.startswith(r + ":") for p in bad)])
        for r in range(1, size):
            manifest = comm.recv_obj(r)
            ok = []
            for rel, n, sha in manifest:
                chunks = (comm.recv_bytes(r, min(CHUNK, n - off)) for off in range(0, n, CHUNK))
                p = receive_file(run_dir, rel, n, sha, chunks)
                if p:
                    problems.append(f"rank {r}: {p}")
                else:
                    ok.append(rel)
            comm.send_obj(ok, r)
        return problems
    rels = own_files(base, rank)
    manifest = [(rel, *digest(Path(base) / rel)) for rel in rels]
    comm.send_obj(manifest, 0)
    for rel, n, _ in manifest:
        with open(Path(base) / rel, "rb") as f:
            for _ in range(0, n, CHUNK):
                comm.send_bytes(f.read(CHUNK), 0)
    ok = comm.recv_obj(0)
    tidy(base, ok)
    return [r for r in rels if r not in ok]


def copy_back(base: Path, run_dir: Path, rank: int) -> None:
    """On a failure, as far as it can: a rank that can reach the run directory through the file
    system (same host or shared) copies its files there; MPI may be unusable by then."""
    if Path(base) == Path(run_dir) or not Path(run_dir).is_dir():
        return
    for rel in own_files(base, rank):
        dst = Path(run_dir) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(base) / rel, dst)
