"""How fast is the analysis? `python -m benchmarks.analysis_speed [--sizes 1e5,1e6,1e7] [--rss]`

Writes synthetic run directories in the documented format (docs/run-format.md; one simulated
1F1B step from harness/synthetic.py, tiled over as many steps as it takes), then times each phase
of `python -m analysis.pebble` separately and prints seconds per million events. --rss adds the
process's peak resident memory during each phase (psutil, sampled every 5 ms; the run's frames
stay loaded across the phases, so each phase's peak includes them). Last, "end to end" runs
`python -m analysis.pebble RUN --format png` itself, as a user would (imports included, its three
parts in forked processes side by side): the issue's goal is measured on that line.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

from analysis import critical, load_run, metrics, style  # noqa: E402
from analysis.chrome import write_chrome  # noqa: E402
from analysis.pages import small_pages  # noqa: E402
from analysis.plots import memory_plot, pebble_graph, planned_frame, timeline  # noqa: E402
from harness.synthetic import MS, pipeline_frames, write_run  # noqa: E402


def synth_run(path: Path, n_events: float, p=4, m=8, lps=8) -> int:
    """A run of about n_events events: one simulated step repeated; returns the event count."""
    fr = pipeline_frames(p=p, m=m, schedule="1f1b", steps=1, layers_per_stage=lps,
                         sample_ns=10 * MS)
    ev, peb = fr["events"], fr["pebbles"]
    k = max(1, math.ceil(n_events / len(ev)))
    period = int(ev["t1"].max() - ev["t0"].min()) + MS

    def tile(df, cols):
        step = np.repeat(np.arange(k), len(df))
        out = pd.concat([df] * k, ignore_index=True)
        for c in cols:
            out[c] = out[c] + step * period
        out["step"] = step
        return out
    ev = tile(ev, ["t0", "t1", "tb"])
    has = ev["pair"].notna()
    pr = ev.loc[has, "pair"].astype(str)
    ev.loc[has, "pair"] = (pr.str[0] + ev.loc[has, "step"].astype(str) + "."
                           + pr.str.split(".", n=1).str[1])
    peb = tile(peb, ["t_store", "t_free"])
    t0, t1 = int(ev["t0"].min()), int(ev["t1"].max())
    t = np.arange(t0, t1, 10 * MS)
    mem = pd.concat([pd.DataFrame({"rank": r, "t": t, "source": "rss",
                                   "bytes": (300 << 20) + (t - t0) % (7 << 20)})
                     for r in range(p)], ignore_index=True)
    stats = pd.DataFrame({"step": np.repeat(np.arange(k), p), "rank": np.tile(np.arange(p), k),
                          "loss": 1.0, "grad_norm": 1.0, "update_norm": 0.1, "step_time": 0.1})
    write_run(path, fr["meta"], ev, peb, mem, stats, fr["schedule"])
    return len(ev)


class PeakRSS:
    """Peak resident set size of this process while the block runs (bytes), sampled by a
    thread every `every` seconds (psutil)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak = every, 0

    def __enter__(self):
        proc = psutil.Process()
        self._read = lambda: proc.memory_info().rss
        self.peak = self._read()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.every):
                self.peak = max(self.peak, self._read())
        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._read())
        return False


def bench(path: Path, n: int, rss: bool = False) -> dict:
    """Seconds of each phase, as `python -m analysis.pebble` runs them (the critical path once,
    shared by the summary, the timeline and the trace); `cpu` holds each phase's CPU seconds
    (on a shared machine wall time also counts other people's jobs); with rss, `rss` each
    phase's peak resident bytes."""
    out, cpu, mem = {}, {}, {}

    def timed(name, fn):
        with PeakRSS() if rss else _Nothing() as pk:
            t, c = time.perf_counter(), time.process_time()
            r = fn()
            out[name] = time.perf_counter() - t
            cpu[name] = time.process_time() - c
        mem[name] = pk.peak
        return r

    def rank_times_and_path():   # as analysis.pebble: one RankTimes for the path and metrics
        rt = critical.RankTimes(run.events)
        return rt, critical.critical_path(run.events, rt=rt)
    run = timed("load", lambda: load_run(path))
    rt, path_ = timed("critical path", rank_times_and_path)
    timed("metrics", lambda: metrics.summarize(run.events, run.pebbles, run.memory, run.meta,
                                               run.steps, path_, rt))
    step = run.steps[-1]
    shown = run.steps[-3:]
    with plt.rc_context(style.RC):
        for name, draw in (
                ("pebble.png", lambda: pebble_graph(run.events, run.pebbles, run.meta, step)),
                ("timeline.png", lambda: timeline(run.events, shown, planned_frame(
                    run.schedule, run.events), critical=path_)),
                ("memory.png", lambda: memory_plot(run.pebbles, run.memory))):
            def go():
                fig, _ = draw()
                fig.savefig(path / name)
                plt.close(fig)
            timed(name, go)
    def trace():
        with open(path / "trace.json", "w", encoding="utf-8") as f:
            write_chrome(f, run.events, run.pebbles, run.memory, run.meta, path_)
    timed("trace.json", trace)
    out["cpu"] = cpu
    if rss:
        out["rss"] = mem
    return out


def end_to_end(path: Path) -> tuple[float, float, int]:
    """`python -m analysis.pebble RUN --format png` as a user runs it (imports included, its three
    forked parts side by side): -> (wall s, CPU s of it and its children, peak memory of them
    together). Memory is the sum of their proportional set sizes (PSS: pages the forks share
    are counted once), sampled every 50 ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "analysis.pebble", str(path), "--out",
                             str(path / "e2e"), "--format", "png", "-q"],
                            stdout=subprocess.DEVNULL)
    top, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for q in [top, *top.children(recursive=True)]:
                total += q.memory_full_info().pss
        except psutil.Error:   # one of them ended between the listing and the reading
            pass
        peak = max(peak, total)
        time.sleep(0.05)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"python -m analysis.pebble {path} failed ({proc.returncode})")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, peak


class _Nothing:
    peak = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6,1e7", help="event counts, comma-separated")
    ap.add_argument("--rss", action="store_true", help="also print each phase's peak resident "
                    "memory (MiB)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end run of "
                    "python -m analysis.pebble (its wall time is the issue's measure)")
    a = ap.parse_args(argv)
    small_pages()    # as analysis.pebble does, so that the phases are timed as it runs them
    with tempfile.TemporaryDirectory() as tmp:
        for size in (float(x) for x in a.sizes.split(",")):
            d = Path(tmp) / f"run{int(size)}"
            t = time.perf_counter()
            # written by a child process: its frames (GBs at 10 M events) never inflate this
            # process's resident memory, so --rss measures the analysis alone
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                n = ex.submit(synth_run, d, size).result()
            print(f"{n:,} events ({len(pd.read_csv(d / 'stats.csv')) // 4:,} steps, 4 ranks): "
                  f"written in {time.perf_counter() - t:.1f} s", flush=True)
            res = bench(d, n, a.rss)
            cpu, mem = res.pop("cpu"), res.pop("rss", {})
            mib = lambda b: f"   peak {b / 2**20:7.0f} MiB" if b else ""  # noqa: E731
            for k, v in res.items():
                print(f"  {k:<13} {v:7.2f} s   {v / n * 1e6:7.2f} s per million events   "
                      f"(cpu {cpu[k]:6.2f} s){mib(mem.get(k))}")
            tot, ctot = sum(res.values()), sum(cpu.values())
            print(f"  {'total':<13} {tot:7.2f} s   {tot / n * 1e6:7.2f} s per million events   "
                  f"(cpu {ctot:6.2f} s){mib(max(mem.values(), default=0))}", flush=True)
            if not a.no_e2e:
                wall, c, peak = end_to_end(d)
                print(f"  {'end to end':<13} {wall:7.2f} s   {wall / n * 1e6:7.2f} s per million "
                      f"events   (cpu {c:6.2f} s)   peak {peak / 2**20:7.0f} MiB   "
                      f"[python -m analysis.pebble --format png: 3 processes]", flush=True)
            shutil.rmtree(d)   # a 10 M run is ~1 GB on disk


if __name__ == "__main__":
    main()
