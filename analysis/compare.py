"""python -m analysis.compare RUN_A RUN_B [--out DIR] [--format png]

Two runs side by side: the per-rank medians of each (metrics.summarize), their differences
B - A printed as a table and written to compare.csv; action by action, each rank's time per
step in each kind of action (one forward, one backward, ..., the receives' wait and transfer)
and per action, A, B and B - A, printed and written to compare-actions.csv; and the two
timelines (the last three steps of each, drawn from each run's step start) on one time axis in
compare.png, with their critical paths. A run of PyTorch's pipeline (`runtime=torch`) says so in
its title. Default DIR: RUN_B/analysis/compare-<name of RUN_A>.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import metrics, style  # noqa: E402
from analysis.dims import figure_formats  # noqa: E402
from analysis.measure import critical, waits  # noqa: E402
from analysis.measure.windows import steady, step_windows  # noqa: E402
from analysis.pages import small_pages  # noqa: E402
from analysis.plots import timeline  # noqa: E402
from analysis.read.load import RunFormatError, load_run  # noqa: E402

# per-rank medians compared (seconds unless the name says otherwise)
COLUMNS = ["span", "compute", "idle", "idle_warmup", "idle_steady", "idle_cooldown",
           "send_wait", "send_transfer", "recv_wait", "recv_transfer", "caused_idle",
           "utilisation", "overlap_pct", "peak_act_bytes"]


def diff_table(sa: dict, sb: dict) -> pd.DataFrame:
    """Long table: rank, metric, a, b, diff (b - a), ratio (b / a) from two summaries."""
    a = pd.DataFrame(sa["per_rank"]).set_index("rank")
    b = pd.DataFrame(sb["per_rank"]).set_index("rank")
    rows = []
    for r in sorted(set(a.index) | set(b.index)):
        for c in COLUMNS:
            va = a.at[r, c] if r in a.index and c in a else None
            vb = b.at[r, c] if r in b.index and c in b else None
            va = None if va is None or pd.isna(va) else float(va)
            vb = None if vb is None or pd.isna(vb) else float(vb)
            rows.append({"rank": int(r), "metric": c, "a": va, "b": vb,
                         "diff": None if va is None or vb is None else vb - va,
                         "ratio": vb / va if va and vb is not None else None})
    return pd.DataFrame(rows)


def text(d: pd.DataFrame, name_a: str, name_b: str) -> str:
    """The table as text: one row per metric, per rank the values of A and B and B - A."""
    lines = [f"A = {name_a}", f"B = {name_b}", ""]
    ranks = sorted(d["rank"].unique())
    head = ["metric"] + [f"r{r} {x}" for r in ranks for x in ("A", "B", "B-A")]
    rows = []
    for c in COLUMNS:
        row = [c + ("" if c.endswith(("pct", "bytes", "utilisation")) else " (ms)")]
        for r in ranks:
            x = d[(d["rank"] == r) & (d["metric"] == c)].iloc[0]
            k = 1e3 if not c.endswith(("pct", "bytes", "utilisation")) else \
                (1 / 2**20 if c.endswith("bytes") else (100 if c == "utilisation" else 1))
            row += ["-" if v is None or pd.isna(v) else f"{v * k:.2f}"
                    for v in (x["a"], x["b"], x["diff"])]
        rows.append(row)
    w = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    lines += ["  ".join(x.rjust(n) if i else x.ljust(n) for i, (x, n) in
                        enumerate(zip(r, w))) for r in [head] + rows]
    lines.append("(utilisation in %, peak_act_bytes in MiB, overlap_pct in %)")
    return "\n".join(lines)


ACTIONS = ("fwd", "loss", "bwd", "bwd_in", "bwd_w", "opt", "norms")


def action_times(events: pd.DataFrame, steps: list) -> pd.DataFrame:
    """Per rank and kind of action, over `steps`: the median per step of the time spent in it
    (s), and per step the microbatches it ran for (compute; opt and norms: 1) or the messages
    (a receive split into its wait and transfer, waits.recv_split). Long table: rank, action,
    per_step, count."""
    ev = events[events["step"].isin(steps)]
    comp = ev[ev["kind"].isin(ACTIONS)]
    d = (comp["end"] - comp["start"]).rename("s")
    rows = []
    per = comp.assign(s=d).groupby(["rank", "kind", "step"], observed=True)
    tot = per["s"].sum()
    cnt = comp.groupby(["rank", "kind", "step"], observed=True)["mb"].nunique()
    for (r, k), t in tot.groupby(level=[0, 1]):
        rows.append({"rank": int(r), "action": k, "per_step": float(t.median()),
                     "count": float(cnt.loc[(r, k)].median())})
    rs = waits.recv_split(ev)
    for col in ("wait", "transfer"):
        t = rs.groupby(["rank", "step"])[col].sum()
        n = rs.groupby(["rank", "step"])[col].size()
        for r, x in t.groupby(level=0):
            rows.append({"rank": int(r), "action": f"recv {col}", "per_step": float(x.median()),
                         "count": float(n.loc[r].median())})
    return pd.DataFrame(rows, columns=["rank", "action", "per_step", "count"])


def action_table(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """action_times of two runs joined: rank, action, a, b (ms per step), b - a, and the same
    per action (per step / count)."""
    m = a.merge(b, on=["rank", "action"], how="outer", suffixes=("_a", "_b"))
    out = pd.DataFrame({"rank": m["rank"], "action": m["action"],
                        "a_ms": m["per_step_a"] * 1e3, "b_ms": m["per_step_b"] * 1e3})
    out["diff_ms"] = out["b_ms"] - out["a_ms"]
    out["a_each_ms"] = out["a_ms"] / m["count_a"]
    out["b_each_ms"] = out["b_ms"] / m["count_b"]
    order = {k: i for i, k in enumerate((*ACTIONS, "recv wait", "recv transfer"))}
    return out.sort_values(["rank", "action"], key=lambda c: c.map(order) if c.name ==
                           "action" else c).reset_index(drop=True)


def action_text(t: pd.DataFrame) -> str:
    lines = ["action by action (ms per step, median over steady steps; 'each': per microbatch "
             "for compute, all of the rank's chunks together, per message for receives)"]
    head = f"{'rank':>4} {'action':<14} {'A':>8} {'B':>8} {'B-A':>8} {'A each':>8} {'B each':>8}"
    lines.append(head)
    for x in t.itertuples():
        lines.append(f"{x.rank:>4} {x.action:<14} " + " ".join(
            "       -" if pd.isna(v) else f"{v:8.2f}"
            for v in (x.a_ms, x.b_ms, x.diff_ms, x.a_each_ms, x.b_each_ms)))
    return "\n".join(lines)


def runtime_of(meta: dict) -> str:
    """'ours', or "PyTorch's <class>" for a run of torch.distributed.pipelining."""
    rt = meta.get("runtime") or {"name": "ours"}
    return f"PyTorch's {rt.get('class')}" if rt.get("name") == "torch" else "ours"


def two_timelines(runs: list, titles: list, fig=None):
    """runs: [(events, steps, critical path, note)]; both on one time axis (the longer one's
    length, the same unit). Returns (fig, axes)."""
    spans = []
    for ev, steps, _, _ in runs:
        e = ev[ev["step"].isin(steps) & (ev["lane"] != "step")]
        lo = step_windows(e)["start"].min()   # where timeline() starts its axis
        spans.append(float(e["end"].max() - lo))
    if fig is None:
        n = sum(e["rank"].nunique() for e, *_ in runs)
        fig = plt.figure(figsize=(style.WIDE, 1.2 + 0.6 * n))
    subs = fig.subfigures(len(runs), 1)
    axes = []
    for sf, (ev, steps, path, note), title in zip(subs, runs, titles):
        _, ax = timeline(ev, steps, fig=sf, critical=path, note=note, span=max(spans),
                         title=title)
        axes += ax
    for sf in subs[1:]:       # one legend is enough: the same symbols
        sf.legends.clear()
    return fig, axes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.compare",
                                 description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--out", help="output folder (default RUN_B/analysis/compare-<RUN_A>)")
    ap.add_argument("--format", default="png", help="figure formats, comma-separated; none: "
                    "no figure")
    a = ap.parse_args(argv)
    small_pages()
    try:
        fmts = figure_formats(a.format)
        runs = [load_run(p) for p in (a.run_a, a.run_b)]
    except (RunFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(r.events.empty for r in runs):
        print("error: a run has no events", file=sys.stderr)
        return 1
    out = Path(a.out) if a.out else runs[1].path / "analysis" / f"compare-{runs[0].path.name}"
    out.mkdir(parents=True, exist_ok=True)
    sums, drawn, titles, acts = [], [], [], []
    for r, label in zip(runs, "AB"):
        steps = r.steps or sorted(int(s) for s in r.events["step"].unique())
        s = metrics.summarize(r.events, r.pebbles, r.memory, r.meta, steps)
        sums.append(s)
        acts.append(action_times(r.events, steady(steps)[1]))
        shown = steps[-3:]
        sch = r.meta.get("schedule") or {}
        titles.append(f"{label}: {r.path.name} ({runtime_of(r.meta)}, {sch.get('name')}, "
                      f"m={sch.get('microbatches')}, overlap={sch.get('overlap')}; step "
                      f"{s['pipeline']['step_span_s'] * 1e3:.1f} ms)")
        drawn.append((r.events, shown, critical.critical_path(r.events, shown),
                      waits.warning_line(s["clock"])))
    d = diff_table(*sums)
    d.insert(0, "b_run", str(runs[1].path))
    d.insert(0, "a_run", str(runs[0].path))
    d.to_csv(out / "compare.csv", index=False)
    print(text(d, f"{runs[0].path} (runtime: {runtime_of(runs[0].meta)})",
               f"{runs[1].path} (runtime: {runtime_of(runs[1].meta)})"))
    at = action_table(*acts)
    at.to_csv(out / "compare-actions.csv", index=False)
    print()
    print(action_text(at))
    if fmts:
        with plt.rc_context(style.RC):
            fig, _ = two_timelines(drawn, titles)
            for f in fmts:
                fig.savefig(out / f"compare.{f}")
            plt.close(fig)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
