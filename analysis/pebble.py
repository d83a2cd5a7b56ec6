"""python -m analysis.pebble RUN [--out DIR] [--step N] [--format png,pdf]

Turn a run directory into the numbers and pictures of what naive model parallelism costs:
metrics.json + steps.csv (and a table on stdout), pebble.{png,pdf} (the measured pebble graph of
one step), timeline.{png,pdf} (several steps, measured and planned), memory.{png,pdf}, and
trace.json (open in ui.perfetto.dev or chrome://tracing). This is the only module of the
analysis that reads or writes files. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

from analysis import chrome, critical, kineto, metrics, report, style, waits  # noqa: E402
from analysis.load import RunFormatError, load_run  # noqa: E402
from analysis.pages import small_pages  # noqa: E402
from analysis.plots import memory_plot, pebble_graph, planned_frame, timeline  # noqa: E402

OUTPUTS = ["metrics.json", "steps.csv", "trace.json", "pebble", "timeline", "memory"]
# a trace.json above this many bytes gets a note: Perfetto's in-browser UI holds ~2 GB of
# memory in all (perfetto.dev/docs/visualization/large-traces), and a trace takes 2-4x its
# size there; 10 M events make a 3.3 GB trace.json
BIG_TRACE = 2**30


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
    ap.add_argument("--serial", action="store_true", help="every output in this process, one "
                    "after another (default: three processes side by side)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    a = ap.parse_args(argv)
    small_pages()     # before the first large array: huge pages cost more than they give here
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
    try:
        return _write(a, run, out, ident, steps, step, log)
    except OSError as e:  # a full disk, no permission: one line naming the path, no half file
        print(f"error: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 1


def _write(a, run, out, ident, steps, step, log) -> int:
    """Every output of main; a write that fails raises OSError naming its file (_writing).

    Three parts run side by side on the machine's cores, in forked processes that share the
    loaded frames: the pebble and memory figures (they need only the frames), the timeline and
    trace.json (they need the critical path), and here the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    serial = a.serial or not _room_for_forks(run, log)
    figures = _start(lambda: _guarded(lambda: _draw(out, formats, log, (
        ("pebble", lambda: pebble_graph(run.events, run.pebbles, run.meta, step)),
        ("memory", lambda: memory_plot(run.pebbles, run.memory))))), serial)
    rt = critical.RankTimes(run.events)      # one lookup table for the path and the blame
    path = critical.critical_path(run.events, rt=rt)   # every step: summary, timeline, trace
    shown = [s for s in steps if s <= step][-3:] or [step]

    def timeline_and_trace():
        steady = run.events[run.events["step"].isin(metrics.steady(steps)[1])]  # as summary's
        note = waits.warning_line(waits.clock_quality(run.meta, metrics.recv_split(run.events)))
        _draw(out, formats, log, (("timeline", lambda: timeline(
            run.events, shown, planned_frame(run.schedule, steady), critical=path,
            note=note)),))
        return [] if a.no_trace else _write_trace(run, out / "trace.json", path, log)
    rest = _start(lambda: _guarded(timeline_and_trace), serial)
    failed = True
    try:
        _write_metrics(a, run, out, ident, steps, log, path, rt)
        failed = False
    finally:
        rc = 0
        for wait in (figures, rest):
            r, lines = wait()
            rc = rc or r
            for line in lines:  # one error line in all: ours, if we failed too
                if not (failed and line.startswith("error:")):
                    print(line, file=sys.stderr)
    log(f"outputs in {out}")
    return rc


FORK_ROOM = 6   # x the frames' bytes, available, for the three processes (measured ~5.5x)


def frames_bytes(run) -> int:
    """Bytes of the run's loaded frames (events, pebbles, memory), as pandas counts them."""
    return sum(int(df.memory_usage(index=True).sum())
               for df in (run.events, run.pebbles, run.memory))


def _room_for_forks(run, log) -> bool:
    """Whether the machine has memory for the two forked parts: each shares the loaded frames
    but builds its own tables. At 10 M events (1.11 GiB of frames) the three processes together
    peaked at 5.9-6.4 GiB (PSS, 4 runs: 5.3-5.8x the frames), one process at 4.5 GiB (4.0x);
    -> False, and one process, where available memory is under FORK_ROOM x the frames'."""
    frames = frames_bytes(run)
    free = psutil.virtual_memory().available
    if free >= FORK_ROOM * frames:
        return True
    log(f"one process: {free / 2**30:.1f} GiB of memory available, under {FORK_ROOM}x the "
        f"run's frames ({frames / 2**30:.1f} GiB)")
    return False


def _start(job, serial: bool):
    """Run job() (-> exit status, lines for stderr) in a forked child; -> a function that waits
    for it and gives its result. Serially (--serial, or off Linux) job runs when waited
    for. The lines travel back by pipe, so that they are printed by this process
    (after its own, and where a test captures them)."""
    if serial or not sys.platform.startswith("linux"):  # macOS: fork unsafe; Windows: none
        return job
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    sys.stdout.flush()
    sys.stderr.flush()  # or the child would write the parent's buffered lines a second time
    child = ctx.Process(target=lambda: send.send(job()))
    child.start()
    send.close()

    def wait():
        try:
            result = recv.recv()
        except EOFError:  # it died before answering (its traceback is on stderr)
            child.join()
            return 1, [f"error: a process writing the analysis died (exit code "
                       f"{child.exitcode})"]
        child.join()
        return result
    return wait


@contextlib.contextmanager
def _writing(target: Path):
    """The write of `target`: if it fails, what it left of the file is removed and the OSError
    raised names the file."""
    try:
        yield target
    except OSError as e:
        if target.is_file():
            target.unlink()
        raise OSError(e.errno, e.strerror, e.filename or str(target)) from e


def _guarded(job) -> tuple[int, list[str]]:
    """job() -> lines for stderr; -> (exit status, lines): a write that fails is one error line
    naming the file (_writing)."""
    try:
        return 0, job()
    except OSError as e:
        return 1, [f"error: cannot write {e.filename}: {e.strerror or e}"]


def _draw(out: Path, formats, log, figures) -> list[str]:
    """Draw each (name, draw) and save it in every format (_writing each file)."""
    with plt.rc_context(style.RC):
        for name, draw in figures:
            fig, _ = draw()
            try:
                for fmt in formats:
                    with _writing(out / f"{name}.{fmt}") as target:
                        fig.savefig(target)
            finally:
                plt.close(fig)
            log(f"drew {name}.{{{','.join(formats)}}}")
    return []


def _write_trace(run, target: Path, path, log) -> list[str]:
    """trace.json, with the run's torch.profiler events merged in (_writing it); -> warning
    lines."""
    seen = len(run.warnings)
    with _writing(target):
        with open(target, "w", encoding="utf-8") as f:
            n = chrome.write_chrome(f, run.events, run.pebbles, run.memory, run.meta, path)
        log(f"wrote trace.json ({n:,} trace events)")
        k = kineto.merge_into(target, run, run.warnings)
    if k:
        log(f"merged {k:,} torch.profiler (Kineto) events into trace.json")
    # the merge's own warnings (metrics.json was written before it)
    lines = [f"warning: {w}" for w in run.warnings[seen:]]
    size = target.stat().st_size
    if size > BIG_TRACE:
        lines.append(f"note: {target} is {size / 1e9:.1f} GB, more than ui.perfetto.dev can "
                     f"hold in a browser: open it through Perfetto's native trace processor "
                     f"(trace_processor --httpd {target.name}, then ui.perfetto.dev); --no-trace "
                     f"skips it")
    return lines


def _write_metrics(a, run, out, ident, steps, log, path, rt) -> dict:
    """metrics.json, steps.csv and the table on stdout; -> the summary."""
    summary = metrics.summarize(run.events, run.pebbles, run.memory, run.meta, steps, path, rt)
    summary = {"run": ident | {"status": run.meta.get("status")}, **summary,
               "warnings": list(run.warnings)}
    per_step = summary.pop("per_step")
    with _writing(out / "steps.csv") as target:
        pd.DataFrame(per_step).to_csv(target, index=False)
    with _writing(out / "metrics.json") as target:
        target.write_text(json.dumps(summary, indent=1))
    log("metrics computed")
    print(report.table(summary, title=str(a.run)), flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
