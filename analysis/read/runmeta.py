"""A run directory's small files: meta.json, stats.csv, and what they say about the run
(status, divergence, where a rank's files stayed, which steps every rank completed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.read.tracefile import RunFormatError, parse_rows
from harness.ops.heartbeat import judge
from harness.runformat import FORMATS, STATS_COLS

STATS_DTYPES = {c: "int64" if c in ("step", "rank") else "float64" for c in STATS_COLS}


def read_meta(d: Path) -> tuple[dict, list]:
    """meta.json -> (meta, warnings): a run whose meta.json says "running" but whose processes
    are gone (harness.ops.heartbeat) gets status "died"; a run that is not complete, a warning."""
    mp = d / "meta.json"
    if not d.is_dir() or not mp.exists():
        raise RunFormatError(f"{mp}: not a run directory (no meta.json)")
    try:
        meta = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{mp}: not valid JSON ({e})") from None
    if meta.get("format", 1) not in FORMATS:
        raise RunFormatError(f"{mp}: unknown run format version {meta.get('format')!r} "
                             f"(this reader knows format={','.join(map(str, FORMATS))})")
    warnings = []
    died = judge(d, meta)
    if died:  # meta.json says running, but its processes are gone: say so (the file stays)
        meta = dict(meta, status="died", error={"type": "Died", "message": died})
    status = meta.get("status", "unknown")
    if status != "complete":
        err = meta.get("error")
        if isinstance(err, dict):
            err = (f"{err.get('type')}: " if err.get("type") not in (None, "Died") else "") \
                + str(err.get("message"))
        warnings.append(f"run status is {status!r}" + (f": {err}" if err else "")
                        + " — loaded what was written")
    return meta, warnings


def read_stats(d: Path, warnings: list) -> pd.DataFrame:
    """stats.csv, or the ranks' own stats.r<R>.csv where it is absent."""
    cols = list(STATS_COLS)
    if (d / "stats.csv").exists():
        df = parse_rows((d / "stats.csv").read_bytes(), d / "stats.csv", STATS_DTYPES, warnings)
        return df if df is not None else pd.DataFrame(columns=cols)
    parts = sorted((d / "ranks").glob("stats.r*.csv"))
    warnings.append("stats.csv absent: read ranks/stats.r*.csv" if parts
                    else "no stats.csv and no ranks/stats.r*.csv")
    frames = []
    for p in parts:
        data = p.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[:data.rfind(b"\n") + 1]
            warnings.append(f"{p}: dropped a truncated last line")
        df = parse_rows(data, p, STATS_DTYPES, warnings)
        if df is None:
            warnings.append(f"{p}: empty file")
        else:
            frames.append(df)
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def local_dir_notes(meta: dict, have) -> list:
    """run.local_dir: for each rank whose trace is not in the run directory (it died, or the
    transfer failed), where its own files stay: one line naming its host and directory."""
    out = []
    for info in meta.get("ranks") or []:
        r, local = info.get("rank"), info.get("local_dir")
        if local and r not in have:
            out.append(f"rank {r}: its files were not moved to the run directory; they stay in "
                       f"{info.get('host')}:{local} (run.local_dir)")
    return out


def divergence(stats: pd.DataFrame, meta: dict) -> list:
    """One line if the training diverged: the first step with a non-finite loss or grad norm."""
    bad = pd.Series(False, index=stats.index)
    p = int(meta.get("world_size") or (stats["rank"].max() + 1 if len(stats) else 1))
    sch = meta.get("schedule") or {}
    # the rank holding the loss stage: the last rank, or rank 0 when the chunks run in a V
    # (zbv, dualpipev: the last stage is rank 0's second chunk)
    last = 0 if sch.get("placement") == "v" and int(sch.get("virtual") or 1) % 2 == 0 else p - 1
    for c in ("loss", "grad_norm"):
        if c in stats:
            v = pd.to_numeric(stats[c], errors="coerce")
            # an empty loss (ranks that are not the last stage) is NaN but not divergence
            bad |= np.isinf(v) | (v.isna() & (c == "grad_norm" or stats["rank"].eq(last)))
    if not bad.any():
        return []
    first = stats[bad].sort_values(["step", "rank"]).iloc[0]
    return [f"training diverged: non-finite loss or gradient norm from step "
            f"{int(first['step'])} (rank {int(first['rank'])}, {int(bad.sum())} rows)"]


def complete_steps(have: dict, ranks, all_steps: list, warnings: list) -> list:
    """Steps every rank finished. have: rank -> the steps it finished (its `step` spans, or
    any event where no rank writes `step` spans); all_steps: every step with an event.
    Gaps are reported per rank."""
    if not all_steps:
        warnings.append("no events at all")
        return []
    complete = [s for s in all_steps if all(s in have.get(r, ()) for r in ranks)]
    for r in ranks:
        got = have.get(r, set())
        miss = [int(s) for s in all_steps if s not in got]
        if miss and len(miss) == len(all_steps):
            warnings.append(f"rank {r}: no complete step")
        elif miss:
            warnings.append(f"rank {r}: step(s) {ranges(miss)} incomplete or missing")
    return complete


def ranges(xs: list) -> str:
    """[1,2,3,7] -> '1-3,7'"""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)
