"""Numbers of a sweep, as pure functions: per-run records from each run's metrics, then medians
and interquartile ranges over repeats (rliable's split: statistics here, drawing in
analysis/plots/sweep.py, file I/O only in analysis/figures.py).

Two tidy frames describe a sweep:
- runs:  one row per run — point, repeat, tag, exp, p, schedule, v (chunks per rank), m,
         overlap, oversubscribed, every other config key the sweep set (`swept`: a column
         named by the key, e.g. model.width), span (s), bubble (measured), bubble_theory
         (with v), bubble_theory_times (zero-bubble theory with the run's F/B/W times),
         bubble_sim (harness.simulate on the run's own times), threads, device, compute (s,
         mean over ranks)
- ranks: one row per (run, rank) — the run's identity columns (swept keys too), then compute,
         send, recv_wait, recv_transfer, send_wait, send_transfer, other_idle, span (s),
         peak_act, peak_theory (bytes), clock_unreliable (the clocks blur its wait/transfer
         split)
Every per-run value is already a median over that run's steady steps (metrics.summarize);
`spread` then takes median and quartiles over the repeats of a point.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.metrics import bubble_theory
from harness.config import keys as config_keys

ID = ["point", "repeat", "tag", "exp", "p", "schedule", "v", "m", "overlap", "oversubscribed"]
# where a rank's step goes: these add up to the step's span (other_idle is the rest)
# (send split like the receive: late-receiver wait and transfer, analysis/measure/waits.py)
PARTS = ["compute", "recv_wait", "recv_transfer", "send_wait", "send_transfer", "other_idle"]


# what makes two runs different configurations beyond (p, schedule, v, m): the tables keep
# them apart (a median over bf16 and fp32 runs, or with and without recomputation, is no number)
CONFIG = ["exp", "model", "precision", "recompute"]
# the config keys a sweep can set (harness.config); those the records carry under a name of
# their own (from meta.json: what ran) are not repeated as columns of their own
KEYS = frozenset(k for k, _, _ in config_keys())
NAMED = frozenset({"exp", "schedule", "precision", "pipeline.microbatches", "pipeline.virtual",
                   "pipeline.overlap", "pipeline.recompute"})


def run_records(row: dict, meta: dict, summary: dict) -> tuple[dict, list[dict]]:
    """One run's record and its per-rank records.

    row: the run's sweep.csv row (point, repeat, tag, oversubscribed, and a column per config
    key the sweep sets); meta: its meta.json; summary: metrics.summarize of its frames (medians
    over steady steps)."""
    sch = meta.get("schedule") or {}
    p = int(meta.get("world_size") or summary["schedule"]["stages"])
    m = int(sch.get("microbatches") or 1)
    name, v = sch.get("name"), int(sch.get("virtual") or 1)
    model = meta.get("model") or {}
    ident = {"point": row.get("point"), "repeat": row.get("repeat"), "tag": row.get("tag"),
             "exp": meta.get("experiment"), "model": model.get("name"),
             # what ran (meta.json), else what the sweep set (a run older than the key)
             "precision": model.get("dtype") or _swept(row, "precision", "fp32"),
             "recompute": sch.get("recompute") or _swept(row, "pipeline.recompute", "none"),
             "p": p, "schedule": name, "v": v, "m": m,
             "overlap": bool(sch.get("overlap")),
             "oversubscribed": bool(row.get("oversubscribed", False)),
             **{k: x for k, x in row.items() if k in KEYS and k not in NAMED}}
    pipe = summary["pipeline"]
    ranks_meta = meta.get("ranks") or [{}]
    run = {**ident, "span": pipe["step_span_s"], "bubble": pipe["bubble_measured"],
           "bubble_theory": bubble_theory(name, p, m, v),
           "bubble_theory_times": _nan(pipe.get("bubble_theory_measured_times")),
           "bubble_sim": _nan(pipe.get("bubble_simulated")),
           "threads": ranks_meta[0].get("threads"), "device": ranks_meta[0].get("device"),
           # mean compute per rank: grows with m on CPU (small matmuls run less efficiently)
           "compute": float(np.mean([r.get("compute") or 0.0 for r in summary["per_rank"]]))}
    ranks = []
    for r in summary["per_rank"]:
        rec = {**ident, "rank": int(r["rank"]), "span": r["span"]}
        for k in PARTS[:-1]:
            rec[k] = r.get(k) or 0.0
        # the clocks blur this rank's wait/transfer split (analysis/waits.clock_quality)
        cq = ((summary.get("clock") or {}).get("split_per_rank") or {}).get(str(r["rank"]))
        rec["clock_unreliable"] = bool(cq is not None and not cq.get("reliable", True))
        # the rest of the span: idle that is neither a blocked receive nor a blocked send
        rec["other_idle"] = max(0.0, (r["span"] or 0.0) - sum(rec[k] for k in PARTS[:-1]))
        rec["peak_act"] = r.get("peak_act_bytes")
        rec["peak_theory"] = r.get("peak_act_theory")
        ranks.append(rec)
    return run, ranks


def _swept(row: dict, key: str, default):
    """The value the sweep set for `key` (its sweep.csv column), else default."""
    v = row.get(key)
    return default if v is None or (isinstance(v, float) and np.isnan(v)) else v


def _nan(x):
    return np.nan if x is None else float(x)


def _none(x):
    return None if x is None or not np.isfinite(x) else float(x)


def spread(df: pd.DataFrame, by: list, cols: list) -> pd.DataFrame:
    """Median, first and third quartile and count over the rows of each group.

    Returns one row per group with columns `by`, then for each c in cols: c (median), c_q1,
    c_q3, and n (rows in the group) and oversubscribed (any row of the group was)."""
    if df.empty:
        return pd.DataFrame(columns=by + [f"{c}{s}" for c in cols for s in ("", "_q1", "_q3")]
                            + ["n", "oversubscribed"])
    g = df.groupby(by, dropna=False)
    out = g[cols].median()
    for c in cols:
        out[f"{c}_q1"] = g[c].quantile(0.25)
        out[f"{c}_q3"] = g[c].quantile(0.75)
    out["n"] = g.size()
    out["oversubscribed"] = g["oversubscribed"].any() if "oversubscribed" in df else False
    return out.reset_index()


def swept(df: pd.DataFrame) -> list[str]:
    """The config keys beyond CONFIG and (p, schedule, v, m) that tell df's rows apart: the
    columns named by one (`run_records`: every key the sweep set, e.g. model.width; runs also
    carry threads and device). Every table groups by them too."""
    return sorted(c for c in df.columns if c in KEYS and c not in NAMED)


def measurements(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that measure schedules (not the lessons' ablations), with the CONFIG columns and v
    (None and 1 in records of an older analysis)."""
    d = runs[runs["tag"] != "lessons"]
    missing = {c: None for c in CONFIG if c not in d} | ({} if "v" in d else {"v": 1})
    return d.assign(**missing) if missing else d


def blocking(runs: pd.DataFrame) -> pd.DataFrame:
    """measurements() of the runs with blocking communication (pipeline.overlap off)."""
    d = measurements(runs)
    return d[~d["overlap"].astype(bool)]


def configs(runs: pd.DataFrame) -> list[dict]:
    """The distinct configurations among the measuring runs: their CONFIG and every swept key
    that takes two values at one (p, schedule, v, m, overlap), which a figure draws as one
    point. (A key that only some points set, such as paper.yaml's data.batch_size of its p=3
    interleaved points, makes no second configuration.)"""
    d = measurements(runs)
    point = ["p", "schedule", "v", "m", "overlap"]
    g = d.groupby(point, dropna=False)
    varies = [k for k in swept(d) if (g[k].nunique(dropna=False) > 1).any()]
    return d[CONFIG + varies].drop_duplicates().to_dict("records")


def bubble_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Figures 2 and 8's data: per (CONFIG, swept keys, p, schedule, v, m), blocking
    communication only: bubble, span, compute, the simulator's bubble and the F/B/W-time
    theory (medians/IQR over repeats), and the closed-form theory with v."""
    d = blocking(runs)
    for c, dflt in (("bubble_sim", np.nan), ("bubble_theory_times", np.nan)):
        if c not in d:            # records of an older analysis
            d = d.assign(**{c: dflt})
    t = spread(d, CONFIG + swept(d) + ["p", "schedule", "v", "m"],
               ["bubble", "span", "compute", "bubble_sim", "bubble_theory_times"])
    t["bubble_theory"] = [bubble_theory(s, int(p), int(m), int(v)) for s, p, m, v in
                          zip(t["schedule"], t["p"], t["m"], t["v"])]
    return t


def memory_table(ranks: pd.DataFrame) -> pd.DataFrame:
    """Figures 3 and 9's data: per (CONFIG, swept keys, p, schedule, v, m, rank), blocking
    runs: peak activation bytes (median/IQR over repeats) and the theory
    (meta.pebbles_theory.peak_bytes)."""
    d = blocking(ranks)
    by = CONFIG + swept(d) + ["p", "schedule", "v", "m", "rank"]
    t = spread(d, by, ["peak_act"])
    # the same groups in the same (sorted) order as spread's
    t["peak_theory"] = d.groupby(by, dropna=False)["peak_theory"].first().to_numpy()
    return t


def stage_table(ranks: pd.DataFrame) -> pd.DataFrame:
    """Compute time per stage and step, per (CONFIG, swept keys, p, schedule, m, rank),
    blocking runs (medians)."""
    d = blocking(ranks)
    return spread(d, CONFIG + swept(d) + ["p", "schedule", "m", "rank"], ["compute"])


def breakdown_table(ranks: pd.DataFrame) -> pd.DataFrame:
    """Figure 4's data: where each rank's step goes, for the (CONFIG, swept keys, p, schedule,
    m) that were run both with and without overlapped communication. Medians over repeats of
    each part."""
    d = measurements(ranks)
    key = CONFIG + swept(d) + ["p", "schedule", "m"]
    d = d[d.groupby(key, dropna=False)["overlap"].transform("nunique") == 2]
    by = key + ["overlap", "rank"]
    t = spread(d, by, PARTS + ["span"])
    # the rest of the median span, so that a bar's parts add up to it exactly (medians of
    # parts need not add up to the median of their sum)
    t["other_idle"] = (t["span"] - t[PARTS[:-1]].sum(axis=1)).clip(lower=0)
    if "clock_unreliable" in d and len(d):   # the same groups in spread's (sorted) order
        t["clock_unreliable"] = d.groupby(by, dropna=False)["clock_unreliable"].any() \
            .to_numpy(bool)
    return t


def representative(runs: pd.DataFrame) -> pd.DataFrame:
    """Per point, the repeat whose step span is the median one (for single-run figures):
    a typical run rather than the fastest or the slowest."""
    dist = (runs["span"] - runs.groupby("point")["span"].transform("median")).abs()
    return runs.loc[dist.groupby(runs["point"]).idxmin()].reset_index(drop=True)


def headline(bubble: pd.DataFrame, memory: pd.DataFrame, breakdown: pd.DataFrame,
             stages: pd.DataFrame | None = None) -> dict:
    """The numbers the captions quote, as plain Python."""
    out = {"bubble": [], "memory_ratio": [], "overlap": []}
    per_stage = ({} if stages is None else
                 {k: [float(x) * 1e3 for x in g.sort_values("rank")["compute"]]
                  for k, g in stages.groupby(["p", "schedule", "m"])})
    for r in bubble.itertuples():
        out["bubble"].append({"p": int(r.p), "schedule": r.schedule, "v": int(r.v),
                              "m": int(r.m), "simulated": _none(r.bubble_sim),
                              "theory_times": _none(r.bubble_theory_times),
                              "compute_stage_ms": per_stage.get((r.p, r.schedule, r.m), []),
                              "measured": float(r.bubble), "q1": float(r.bubble_q1),
                              "q3": float(r.bubble_q3), "theory": r.bubble_theory,
                              "span_ms": float(r.span) * 1e3,
                              "compute_ms": float(r.compute) * 1e3, "n": int(r.n)})
    s0 = memory[memory["rank"] == 0].pivot_table(index=["p", "m"], columns="schedule",
                                                 values=["peak_act", "peak_theory"])
    for (p, m), r in s0.iterrows():
        try:
            ratio = r[("peak_act", "1f1b")] / r[("peak_act", "gpipe")]
            th = r[("peak_theory", "1f1b")] / r[("peak_theory", "gpipe")]
        except KeyError:
            continue
        if not (np.isfinite(ratio) and np.isfinite(th)):  # m where only naive ran
            continue
        out["memory_ratio"].append({"p": int(p), "m": int(m), "stage": 0,
                                    "measured": float(ratio), "theory": float(th)})
    if len(breakdown):
        g = breakdown.groupby(["p", "schedule", "m", "overlap"])
        sp, comp = g["span"].first().unstack(), g["compute"].mean().unstack()
        for (p, s, m), r in sp.iterrows():
            c = comp.loc[(p, s, m)]   # the same work either way: its change is run-to-run noise
            out["overlap"].append({"p": int(p), "schedule": s, "m": int(m),
                                   "span_ms_blocking": float(r[False]) * 1e3,
                                   "span_ms_overlap": float(r[True]) * 1e3,
                                   "compute_ms_blocking": float(c[False]) * 1e3,
                                   "compute_ms_overlap": float(c[True]) * 1e3})
    return out
