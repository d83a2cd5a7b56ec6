"""python -m analysis.pebble RUN [--out DIR] [--step N] [--format png,pdf] [--trace-steps A:B]

Turn a run directory into the numbers and pictures of what naive model parallelism costs:
metrics.json + steps.csv (and a table on stdout), pebble.{png,pdf} (the measured pebble graph of
one step), timeline.{png,pdf} (several steps, measured and planned), memory.{png,pdf}, and
trace.json (open in ui.perfetto.dev or chrome://tracing). This is the only module of the
analysis that reads or writes files. Progress goes to stderr.

A run of any length is read once, a chunk of steps at a time, in two processes side by side
(analysis.stream): memory is that of a chunk. trace.json holds every step of a run that makes
up to --trace-max-events trace events (slices, counter values); of a longer one, the first two
steady steps, the slowest step and the last in full (--trace-steps A:B or --trace all for
others), and over the whole run one counter per step: the step's time, its bubble and each
rank's peak activation bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from analysis import chrome, metrics, report, stream
from analysis.dims import MEMORY_SIZE, columns_for, figure_formats
from analysis.measure import waits
from analysis.measure.plan import planned_from
from analysis.pages import small_pages
from analysis.read import kineto
from analysis.read.runmeta import ranges
from analysis.read.scan import open_run
from analysis.read.tracefile import RunFormatError

OUTPUTS = ["metrics.json", "steps.csv", "trace.json", "pebble", "timeline", "memory"]
# a trace.json above this many bytes gets a note: Perfetto's in-browser UI holds ~2 GB of
# memory in all (perfetto.dev/docs/visualization/large-traces), and a trace takes 2-4x its
# size there; 10 M events make a 3.3 GB trace.json
BIG_TRACE = 2**30
TRACE_EVENTS = 1_000_000   # runs with more events get a window of steps in trace.json


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, msg: str):
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.2f} s] {msg}", file=sys.stderr, flush=True)


def _identity(idx) -> dict:
    m = idx.meta
    return {"path": str(idx.path.resolve()), "experiment": m.get("experiment"),
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
                    "(default: png,pdf); none: the numbers and trace.json, no figure")
    ap.add_argument("--no-trace", action="store_true", help="skip trace.json")
    ap.add_argument("--trace", choices=("auto", "all"), default="auto",
                    help="steps in trace.json: auto (all of a run of up to --trace-max-events "
                    "events; else the first steady steps, the slowest and the last), all")
    ap.add_argument("--trace-steps", metavar="A:B", help="the steps A..B (inclusive) in "
                    "trace.json, in full")
    ap.add_argument("--trace-max-events", type=int, default=TRACE_EVENTS, metavar="N",
                    help=f"a run whose every step would make more trace events gets a window "
                    f"of steps (default {TRACE_EVENTS:,})")
    ap.add_argument("--serial", action="store_true", help="every part in this process, one "
                    "after another (default: side by side, in processes of their own)")
    ap.add_argument("--chunk-rows", type=int, default=stream.TARGET, metavar="N",
                    help=f"rows (events and pebbles) per chunk of steps read at a time "
                    f"(default {stream.TARGET:,})")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    a = ap.parse_args(argv)
    try:
        a.format = figure_formats(a.format)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    small_pages()     # before the first large array: huge pages cost more than they give here
    log = _Progress(a.quiet)

    try:
        log(f"indexing {a.run}")
        idx = open_run(a.run, workers=1 if a.serial else _cores())
    except RunFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_ev = int(idx.ev_rows.sum())
    log(f"indexed {n_ev:,} events, {int(idx.rows.sum()) - n_ev:,} pebbles in "
        f"{len(idx.steps):,} steps from {idx.world} ranks")
    for w in idx.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not n_ev:
        print(f"error: {a.run}: no events to analyse", file=sys.stderr)
        return 1
    out = Path(a.out) if a.out else idx.path / "analysis"
    ident = _identity(idx)
    have = idx.steps[idx.ev_rows > 0].tolist()
    steps = idx.complete or have
    step = a.step if a.step is not None else steps[-1]
    if step not in set(have):  # checked before anything is written
        print(f"error: --step {step}: not in the run (steps {steps[0]}..{steps[-1]})",
              file=sys.stderr)
        return 2
    try:
        trace = None if a.no_trace else _trace_steps(a, idx, steps, n_ev)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _check_out(out, ident, out.resolve() == (idx.path / "analysis").resolve())
    try:
        return _write(a, idx, out, ident, steps, step, trace, log)
    except OSError as e:  # a full disk, no permission: one line naming the path, no half file
        print(f"error: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 1


def _trace_steps(a, idx, steps: list, n_ev: int):
    """The steps trace.json holds in full: a set, "all", or "window" (the first two steady
    steps and the last, and the slowest, which the pass finds)."""
    if a.trace_steps:
        lo, sep, hi = a.trace_steps.partition(":")
        if not sep or not lo.strip().lstrip("-").isdigit() or not hi.strip().lstrip("-").isdigit():
            raise ValueError(f"--trace-steps {a.trace_steps!r}: expected A:B, two step numbers")
        lo, hi = int(lo), int(hi)
        got = {s for s in idx.steps.tolist() if lo <= s <= hi}
        if not got:
            raise ValueError(f"--trace-steps {a.trace_steps}: no step of the run in it (steps "
                             f"{int(idx.steps[0])}..{int(idx.steps[-1])})")
        return got
    # the trace's events if it held every step: a slice per event, a counter value at each
    # pebble's store and free, one per memory sample
    samples = sum(int(fi.rows.sum()) for (kind, _), fi in idx.files.items() if kind == "memory")
    whole = n_ev + 2 * (int(idx.rows.sum()) - n_ev) + samples
    if a.trace == "all" or whole <= a.trace_max_events:
        return "all"
    return "window"


def _write(a, idx, out, ident, steps, step, trace, log) -> int:
    """Every output of main; a write that fails raises OSError naming its file (_writing).

    The pass over the run (analysis.stream) runs in two processes; then three parts side by
    side: the pebble graph and the timeline with trace.json in forked processes, the metrics
    and the memory figure here."""
    out.mkdir(parents=True, exist_ok=True)
    formats = a.format
    serial = a.serial
    shown = [s for s in steps if s <= step][-3:] or [step]
    stead = metrics.steady(steps)[1]
    window = trace == "window"
    if window:
        trace = set(stead[:2]) | {steps[-1]}
    cols = columns_for(MEMORY_SIZE[0])      # what the memory figure's columns will be
    tmp = Path(tempfile.mkdtemp(prefix=".analysis-", dir=out))
    try:
        opts = stream.Options(columns=cols, pebble_step=step, timeline_steps=tuple(shown),
                              trace_steps=trace, slowest=window, folder=tmp,
                              target=a.chunk_rows, workers=1 if serial else _cores())
        drawing = _Drawing()    # matplotlib, imported while the pass runs (it waits here)
        res = stream.analyse(idx, opts, log, on_started=drawing.start if formats else None)
        if formats:
            drawing.ready()
        return _outputs(a, idx, out, ident, steps, step, shown, formats, serial, res, window,
                        log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cores() -> int:
    """Processes for the pass: the cores this process may run on (at most 2 are used: the
    pass reads the run's files, and more readers than two gain nothing on a laptop's disk)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        n = os.cpu_count() or 1
    return max(1, min(2, n))


class _Drawing:
    """The figures' imports (matplotlib and analysis.plots: a third of the start-up) made in a
    thread of this process while the pass's workers run and this process waits for them:
    started after they are forked (a fork must not happen while a thread imports), done before
    the outputs' forks."""

    def __init__(self):
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=_import_drawing, daemon=True)
        self.thread.start()

    def ready(self):
        if self.thread is not None:
            self.thread.join()
        _import_drawing()


def _import_drawing():
    # matplotlib and the plots: for the outputs only, imported during the pass (_Drawing)
    import matplotlib
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot  # noqa: F401
    import analysis.plots  # noqa: F401
    import analysis.style  # noqa: F401


def _outputs(a, idx, out, ident, steps, step, shown, formats, serial, res, window, log) -> int:
    from analysis.plots import draw_memory, pebble_graph, timeline  # imported (_Drawing)
    meta = idx.meta
    note = waits.warning_line(res.summary["clock"])

    def pebble():
        peb = res.kept.get("pebble")
        return _draw(out, formats, log, (
            ("pebble", lambda: pebble_graph(peb[0], peb[1], meta, step)),))

    def timeline_and_trace():
        ev, path = res.kept.get("timeline", (None, None))
        planned = planned_from(idx.schedule, res.durations, res.latency)
        _draw(out, formats, log, (("timeline", lambda: timeline(
            ev, shown, planned, critical=path, note=note)),))
        return [] if a.no_trace else _write_trace(idx, out / "trace.json", res, window, log)
    # three parts side by side: the pebble graph; the timeline and trace.json; here the metrics,
    # then the memory figure (the shortest to draw)
    jobs = [_start(lambda: _guarded(pebble), serial),
            _start(lambda: _guarded(timeline_and_trace), serial)]
    failed = True
    try:
        _write_metrics(a, idx, out, ident, steps, log, res)
        failed = False
        mem = _guarded(lambda: _draw(out, formats, log, (
            ("memory", lambda: draw_memory(res.curves)),)))
        jobs.append(lambda: mem)
    finally:
        rc, said = 0, failed   # one error line in all: ours if we failed, else the first one
        for wait in jobs:
            r, lines = wait()
            rc = rc or r
            for line in lines:
                if line.startswith("error:"):
                    if said:
                        continue
                    said = True
                print(line, file=sys.stderr)
    log(f"outputs in {out}")
    return rc


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
    """The write of `target`: if it fails, whatever the exception, what it left of the file is
    removed; an OSError anywhere in the exception's chain (a library that fails again while
    cleaning up after a full disk raises something else, with the OSError as its context) is
    raised as an OSError naming the file."""
    try:
        yield target
    except BaseException as e:
        with contextlib.suppress(OSError):
            target.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, cause.filename or str(target)) from e


def _os_error(e: BaseException | None) -> OSError | None:
    """The first OSError among e, its cause and its context, and theirs."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _guarded(job) -> tuple[int, list[str]]:
    """job() -> lines for stderr; -> (exit status, lines): a write that fails is one error line
    naming the file (_writing)."""
    try:
        return 0, job()
    except OSError as e:
        return 1, [f"error: cannot write {e.filename}: {e.strerror or e}"]


def _draw(out: Path, formats, log, figures) -> list[str]:
    """Draw each (name, draw) and save it in every format (_writing each file); with no
    format, nothing is drawn."""
    if not formats:
        return []
    # both imported already (_Drawing): not at the top, so that the start-up is without them
    import matplotlib.pyplot as plt
    from analysis import style
    with plt.rc_context(style.RC):
        for name, draw in figures:
            fig, _ = draw()
            try:
                for fmt in formats:
                    # drawn into memory, then written: matplotlib's PDF backend, when its file
                    # cannot be written, fails again while closing it (zlib.error or
                    # AttributeError, the OSError only their context)
                    buf = io.BytesIO()
                    fig.savefig(buf, format=fmt)
                    with _writing(out / f"{name}.{fmt}") as target:
                        target.write_bytes(buf.getbuffer())
            finally:
                plt.close(fig)
            log(f"drew {name}.{{{','.join(formats)}}}")
    return []


def _write_trace(idx, target: Path, res, window: bool, log) -> list[str]:
    """trace.json: the kept steps' events, the per-step tracks of the whole run, and the run's
    torch.profiler events (_writing it); -> warning lines."""
    frags = list(res.fragments)
    if window and res.slowest is not None and not any(res.slowest[1] in f.steps for f in frags):
        frags.append(stream.slowest_fragment(idx, res.slowest[1], res.opts))
    frags.sort(key=lambda f: f.steps[0])
    lanes, seen, crit = [], set(), set()
    for f in frags:
        for x in f.lanes:
            if x not in seen:
                seen.add(x)
                lanes.append(x)
        crit |= f.critical_ranks
    world = int(idx.world)
    md = chrome.metadata(sorted(idx.ranks), lanes, {world: "run: per step"})
    md += chrome.critical_names(crit)
    shown = sorted(s for f in frags for s in f.steps)
    other = chrome.other_data(idx.meta, steps_in_full=_spans(shown), per_step_tracks=(
        f"pid {world}: step time (ms), bubble (%) per step; each rank: peak activation bytes "
        f"per step"))
    warnings = []

    def parts():
        yield chrome._lines(md)
        for f in frags:
            yield f.read(), f.count
        yield from _step_tracks(res.rows, world)
    with _writing(target):
        with open(target, "wb") as fh:
            n = chrome.assemble(fh, parts(), other)
        log(f"wrote trace.json ({n:,} trace events, steps {_spans(shown)} in full)")
        run = _KinetoRun(idx)
        k = kineto.merge_into(target, run, warnings)
    if k:
        log(f"merged {k:,} torch.profiler (Kineto) events into trace.json")
    lines = [f"warning: {w}" for w in warnings]
    size = target.stat().st_size
    if size > BIG_TRACE:
        lines.append(f"note: {target} is {size / 1e9:.1f} GB, more than ui.perfetto.dev can "
                     f"hold in a browser: open it through Perfetto's native trace processor "
                     f"(trace_processor --httpd {target.name}, then ui.perfetto.dev), or keep "
                     f"fewer steps (--trace-steps A:B); --no-trace skips it")
    return lines


class _KinetoRun:
    """What analysis.read.kineto reads of a run."""

    def __init__(self, idx):
        self.path, self.meta, self.origin_ns = idx.path, idx.meta, idx.origin
        self.world_size = idx.world


def _spans(steps: list) -> str:
    return ranges(sorted(set(steps)))


def _step_tracks(rows, world: int):
    """Counter tracks over the whole run, one value per step at its window's start: the
    step's time and bubble (process `world`), each rank's peak activation bytes; a chunk's
    rows at a time (stream.StepRows)."""
    for table in rows.frames():
        yield from _tracks(table, world)


def _tracks(table, world: int):
    if not len(table):
        return
    t = table[np.isfinite(table["w0"].to_numpy(float))]
    per = t.groupby("step").agg(w0=("w0", "first"), span=("span", "first"))
    per["bubble"] = (t["idle"] / t["span"]).groupby(t["step"]).mean()
    ts = per["w0"].to_numpy(float)
    pid = np.full(len(per), world)
    yield from chrome._counters(ts, pid, per["span"].to_numpy(float) * 1e3, "step time", arg="ms")
    yield from chrome._counters(ts, pid, per["bubble"].to_numpy(float) * 100, "bubble", arg="%")
    pk = t[t["peak_act_bytes"].notna()]
    if len(pk):
        yield from chrome._counters(pk["w0"].to_numpy(float), pk["rank"].to_numpy(),
                                    pk["peak_act_bytes"].to_numpy(np.int64),
                                    "peak activations per step")


def _write_metrics(a, idx, out, ident, steps, log, res) -> dict:
    """metrics.json, steps.csv and the table on stdout; -> the summary."""
    summary = {"run": ident | {"status": idx.meta.get("status")}, **res.summary,
               "warnings": list(idx.warnings)}
    with _writing(out / "steps.csv") as target:
        # written from the rows themselves, as one-row-per-record text would be (NaN empty),
        # a chunk's at a time, typed as one table of them would be (stream.StepRows)
        with open(target, "w", newline="") as f:
            for i, t in enumerate(res.rows.frames()):
                t.drop(columns=["w0"]).to_csv(f, index=False, header=i == 0)
            if not res.rows.n:
                f.write("\n")
    with _writing(out / "metrics.json") as target:
        target.write_text(json.dumps(summary, indent=1))
    log("metrics computed")
    print(report.table(summary, title=str(a.run)), flush=True)
    return summary


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # every output is written and closed, the forked parts joined: nothing is left for the
    # interpreter's teardown to do but free the heap, object by object (~0.15 s at 10^6 events)
    os._exit(code)
