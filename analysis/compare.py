"""python -m analysis.compare RUN_A RUN_B [--out DIR] [--format png]

Two runs side by side: the per-rank medians of each (metrics.summarize), their differences
B - A printed as a table and written to compare.csv, and the two timelines (the last three
steps of each, drawn from each run's step start) on one time axis in compare.png, with their
critical paths. Default DIR: RUN_B/analysis/compare-<name of RUN_A>.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import critical, metrics, style, waits  # noqa: E402
from analysis.load import RunFormatError, load_run  # noqa: E402
from analysis.pages import small_pages  # noqa: E402
from analysis.plots import timeline  # noqa: E402
from analysis.windows import step_windows  # noqa: E402

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
    ap.add_argument("--format", default="png", help="figure formats, comma-separated")
    a = ap.parse_args(argv)
    small_pages()
    try:
        runs = [load_run(p) for p in (a.run_a, a.run_b)]
    except RunFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(r.events.empty for r in runs):
        print("error: a run has no events", file=sys.stderr)
        return 1
    out = Path(a.out) if a.out else runs[1].path / "analysis" / f"compare-{runs[0].path.name}"
    out.mkdir(parents=True, exist_ok=True)
    sums, drawn, titles = [], [], []
    for r, label in zip(runs, "AB"):
        steps = r.steps or sorted(int(s) for s in r.events["step"].unique())
        s = metrics.summarize(r.events, r.pebbles, r.memory, r.meta, steps)
        sums.append(s)
        shown = steps[-3:]
        sch = r.meta.get("schedule") or {}
        titles.append(f"{label}: {r.path.name} ({sch.get('name')}, m={sch.get('microbatches')}, "
                      f"overlap={sch.get('overlap')}; step {s['pipeline']['step_span_s'] * 1e3:.1f}"
                      f" ms)")
        drawn.append((r.events, shown, critical.critical_path(r.events, shown),
                      waits.warning_line(s["clock"])))
    d = diff_table(*sums)
    d.insert(0, "b_run", str(runs[1].path))
    d.insert(0, "a_run", str(runs[0].path))
    d.to_csv(out / "compare.csv", index=False)
    print(text(d, str(runs[0].path), str(runs[1].path)))
    with plt.rc_context(style.RC):
        fig, _ = two_timelines(drawn, titles)
        for f in [x for x in a.format.split(",") if x]:
            fig.savefig(out / f"compare.{f}")
        plt.close(fig)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
