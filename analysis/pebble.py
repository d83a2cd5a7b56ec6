"""python -m analysis.pebble RUN [--out DIR] [--step N] [--format png,pdf]

Turn a run directory into the numbers and pictures of what naive model parallelism costs:
metrics.json + steps.csv (and a table on stdout), pebble.{png,pdf} (the measured pebble graph of
one step), timeline.{png,pdf} (several steps, measured and planned), memory.{png,pdf}, and
trace.json (open in ui.perfetto.dev or chrome://tracing). This is the only module of the
analysis that reads or writes files. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import chrome, critical, kineto, metrics, report, style, waits  # noqa: E402
from analysis.load import RunFormatError, load_run  # noqa: E402
from analysis.plots import memory_plot, pebble_graph, planned_frame, timeline  # noqa: E402

OUTPUTS = ["metrics.json", "steps.csv", "trace.json", "pebble", "timeline", "memory"]


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, msg: str):
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.2f} s] {msg}", file=sys.stderr, flush=True)


def _identity(run) -> dict:
    m = run.meta
    return {"path": str(run.path.resolve()), "experiment": m.get("experiment"),
            "start_time": m.get("start_time"), "world_size": m.get("world_size")}


def _check_out(out: Path, ident: dict, own: bool) -> None:
    """Refuse to overwrite another run's analysis (or unrelated files with our names).

    `own`: out is RUN/analysis, which belongs to RUN even if the run folder was moved, so the
    run's meta decides; elsewhere the run's path must match too."""
    if not out.exists():
        return
    prev = out / "metrics.json"
    if prev.exists():
        try:
            old = json.loads(prev.read_text()).get("run", {})
        except (json.JSONDecodeError, AttributeError):
            old = {}
        keys = ("experiment", "start_time", "world_size") + (() if own else ("path",))
        same = all(old.get(k) == ident[k] for k in keys)
        if not same:
            raise SystemExit(f"error: {out} holds the analysis of another run "
                             f"({old.get('path', 'unknown')}); choose another --out")
        return
    clash = [p.name for p in out.iterdir() if p.stem in {Path(o).stem for o in OUTPUTS}]
    if clash:
        raise SystemExit(f"error: {out} already has {', '.join(sorted(clash))} not written by "
                         f"this tool for this run; choose another --out")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m analysis.pebble", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (holds meta.json, trace/, ...)")
    ap.add_argument("--out", help="output folder (default: RUN/analysis); never another run's")
    ap.add_argument("--step", type=int, help="step drawn in the pebble graph and ending the "
                    "timeline (default: the last complete step)")
    ap.add_argument("--format", default="png,pdf", help="figure formats, comma-separated "
                    "(default: png,pdf)")
    ap.add_argument("--no-trace", action="store_true", help="skip trace.json")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    a = ap.parse_args(argv)
    log = _Progress(a.quiet)

    try:
        log(f"loading {a.run}")
        run = load_run(a.run)
    except RunFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"loaded {len(run.events):,} events, {len(run.pebbles):,} pebbles, "
        f"{len(run.memory):,} memory samples from {run.world_size} ranks")
    for w in run.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if run.events.empty:
        print(f"error: {a.run}: no events to analyse", file=sys.stderr)
        return 1
    out = Path(a.out) if a.out else run.path / "analysis"
    ident = _identity(run)
    steps = run.steps or sorted(int(s) for s in run.events["step"].unique())
    step = a.step if a.step is not None else steps[-1]
    if step not in set(run.events["step"]):  # checked before anything is written
        print(f"error: --step {step}: not in the run (steps {steps[0]}..{steps[-1]})",
              file=sys.stderr)
        return 2
    _check_out(out, ident, out.resolve() == (run.path / "analysis").resolve())
    writing = [out]
    try:
        return _write(a, run, out, ident, steps, step, log, writing)
    except OSError as e:  # a full disk, no permission: one line naming the path, no half file
        where = e.filename or writing[0]
        if writing[0] != out and Path(writing[0]).is_file():
            Path(writing[0]).unlink(missing_ok=True)
        print(f"error: cannot write {where}: {e.strerror or e}", file=sys.stderr)
        return 1


def _write(a, run, out, ident, steps, step, log, writing) -> int:
    """Every output of main; `writing[0]` names the file being written (for the error)."""
    out.mkdir(parents=True, exist_ok=True)
    path = critical.critical_path(run.events)     # every step: the summary, timeline and trace
    summary = metrics.summarize(run.events, run.pebbles, run.memory, run.meta, steps, path)
    summary = {"run": ident | {"status": run.meta.get("status")}, **summary,
               "warnings": run.warnings}
    per_step = summary.pop("per_step")
    writing[0] = out / "steps.csv"
    pd.DataFrame(per_step).to_csv(writing[0], index=False)
    writing[0] = out / "metrics.json"
    writing[0].write_text(json.dumps(summary, indent=1))
    log("metrics computed")
    print(report.table(summary, title=str(a.run)))

    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    shown = [s for s in steps if s <= step][-3:] or [step]
    steady = run.events[run.events["step"].isin(summary["steps"]["steady"])]
    note = waits.warning_line(summary["clock"])
    with plt.rc_context(style.RC):
        for name, draw in (
                ("pebble", lambda: pebble_graph(run.events, run.pebbles, run.meta, step)),
                ("timeline", lambda: timeline(run.events, shown,
                                              planned_frame(run.schedule, steady),
                                              critical=path, note=note)),
                ("memory", lambda: memory_plot(run.pebbles, run.memory))):
            fig, _ = draw()
            for fmt in formats:
                writing[0] = out / f"{name}.{fmt}"
                try:
                    fig.savefig(writing[0])
                except OSError:
                    plt.close(fig)
                    raise
            plt.close(fig)
            log(f"drew {name}.{{{','.join(formats)}}}")
    if not a.no_trace:
        writing[0] = out / "trace.json"
        with open(writing[0], "w", encoding="utf-8") as f:
            n = chrome.write_chrome(f, run.events, run.pebbles, run.memory, run.meta, path)
        log(f"wrote trace.json ({n:,} trace events)")
        k = kineto.merge_into(writing[0], run, run.warnings)
        if k:
            log(f"merged {k:,} torch.profiler (Kineto) events into trace.json")
    log(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
