"""How fast is the analysis, and in how much memory? `python -m benchmarks.analysis_speed
[--sizes 1e5,1e6,1e7,1e8] [--repeat N] [--keep DIR]`

For each size, writes a synthetic run directory in the harness's own format (docs/run-format.md,
format 2: an Arrow record batch per step and rank, as the harness flushes them): one simulated
4-rank 1F1B step (harness/synthetic.py; 632 events, 288 pebbles, 274 ms) repeated step after
step, streamed to the files, so writing a run takes the memory of a step, not of the run. Then
runs `python -m analysis.pebble RUN --format png` as a user does (imports included, the pass
in two processes, the outputs side by side) and reports, from its progress lines and a 20 ms
sampler of its process tree:

- per phase (start-up: the imports; index: the pass over the files' batches; pass: the chunks
  of steps analysed; outputs: metrics.json, steps.csv, the three figures, trace.json): wall
  seconds, CPU seconds of the processes, and the peak memory of the tree, as the sum of the
  processes' proportional set sizes (PSS: pages the forked processes share counted once);
- end to end: wall, CPU, peak, and the run's events, pebbles, steps and bytes on disk.

Times and memory come from two analyses of the run: reading the processes' PSS every 20 ms
(/proc/PID/smaps: every mapping walked) takes a share of a core from the analysis it watches
(measured: +20 % wall at 10^7 events), so the times are those of an analysis sampled for CPU
times only, the peaks those of a second one sampled for PSS.

Medians over --repeat runs of the analysis (the run is written once). On this 2-core machine
other jobs move wall times: compare within one invocation.
"""
from __future__ import annotations

import argparse
import math
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from harness import runformat as F
from harness.synthetic import MS, pipeline_frames, write_run
from harness.trace.writer import frame_batches

# each phase and the progress line that ends it: start-up (the imports) until "indexing", ...
PHASES = (("start-up", "indexing "), ("index", "indexed "), ("pass", "analysed "),
          ("outputs", "outputs in "))


def synth_run(path: Path, n_events: float, p: int = 4, m: int = 8, lps: int = 8) -> dict:
    """A run of about n_events events: one simulated 1F1B step repeated, written step by step
    (a record batch per step and rank and kind, as the harness writes them). -> its sizes."""
    fr = pipeline_frames(p=p, m=m, schedule="1f1b", steps=1, layers_per_stage=lps,
                         sample_ns=10 * MS)
    ev, peb, mem = fr["events"], fr["pebbles"], fr["memory"]
    k = max(1, math.ceil(n_events / len(ev)))
    period = int(ev["t1"].max() - ev["t0"].min()) + MS
    meta = dict(fr["meta"], status="complete")
    # meta.json, schedule.json, stats.csv: small; the trace files are written below
    stats = __import__("pandas").DataFrame({
        "step": np.repeat(np.arange(k), p), "rank": np.tile(np.arange(p), k), "loss": 1.0,
        "grad_norm": 1.0, "update_norm": 0.1, "step_time": 0.1})
    write_run(path, meta, None, None, None, stats, fr["schedule"])
    per_step_mem = mem[mem["t"] < mem["t"].min() + period]
    for r in range(p):
        for kind, df, times in (("events", ev, ("t0", "t1", "tb")),
                                ("pebbles", peb, ("t_store", "t_free")),
                                ("memory", per_step_mem, ("t",))):
            part = df[df["rank"] == r].reset_index(drop=True)
            schema, (batch,) = frame_batches(kind, r, part, [len(part)])
            _tiled(path / F.trace_file(kind, r), schema, batch, k, period, times)
    return {"steps": k, "events": k * len(ev), "pebbles": k * len(peb),
            "samples": k * len(per_step_mem),
            "bytes": sum(f.stat().st_size for f in (path / "trace").iterdir())}


def _tiled(target: Path, schema, batch, k: int, period: int, times) -> None:
    """Write `batch` k times, step s with its times + s * period, its step column s and its
    pair ids for step s; a memory file's batches cut every 25 samples as the sampler's."""
    cols = {n: batch.column(n) for n in schema.names}
    pair = cols.get("pair")
    if pair is not None:     # A0.3.0>1 -> prefix "A", suffix ".3.0>1": step s goes between
        txt = pc.fill_null(pair, "")
        head, tail = pc.utf8_slice_codeunits(txt, 0, 1), pc.utf8_slice_codeunits(txt, 2, 10**6)
        null = pair.is_null()
    with open(target, "wb") as f, ipc.new_stream(
            f, schema, options=ipc.IpcWriteOptions(emit_dictionary_deltas=True)) as w:
        for s in range(k):
            arrays = []
            for n in schema.names:
                c = cols[n]
                if n in times:
                    c = pc.add(c, pa.scalar(s * period, pa.int64()))
                elif n == "step":
                    c = pa.array(np.full(len(batch), s, np.int32))
                elif n == "pair":
                    c = pc.if_else(null, pa.scalar(None, pa.string()), pc.binary_join_element_wise(
                        head, pa.scalar(str(s)), tail, ""))
                arrays.append(c)
            w.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))


def measure(run: Path, out: Path, pss_too: bool = True) -> dict:
    """`python -m analysis.pebble RUN --format png` in a subprocess: per phase and in all,
    wall s, CPU s and (pss_too) peak PSS (bytes) of its process tree. Reading a process's PSS
    (/proc/PID/smaps, every mapping) every 20 ms takes a share of a core from what it measures:
    time is measured in a run without it (pss_too=False; CPU times alone are cheap to read)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-m", "analysis.pebble", str(run), "--out",
                             str(out), "--format", "png"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    top = psutil.Process(proc.pid)
    t0 = time.perf_counter()
    lines = []                # (seconds since the start, line) as the lines come

    def read():
        for line in proc.stderr:
            lines.append((time.perf_counter() - t0, line))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples = []            # (t, pss, cpu) of the tree
    cpu_of: dict = {}       # pid -> last CPU seconds seen (a process that ended keeps its)
    while proc.poll() is None:
        pss = 0
        try:
            for q in [top, *top.children(recursive=True)]:
                with q.oneshot():
                    if pss_too:
                        pss += q.memory_full_info().pss
                    ct = q.cpu_times()
                    cpu_of[q.pid] = ct.user + ct.system
        except psutil.Error:   # one of them ended between the listing and the reading
            pass
        samples.append((time.perf_counter() - t0, pss, sum(cpu_of.values())))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    reader.join()
    err = "".join(line for _, line in lines)
    if proc.returncode:
        raise SystemExit(f"python -m analysis.pebble {run} failed ({proc.returncode}):\n{err}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)   # it and its forks, once reaped
    marks = {}        # each phase's first line, when it came (the phase before it ends there)
    for t, line in lines:
        m = re.match(r"\[\s*([\d.]+) s\] (.*)", line)
        if m:
            for name, start in PHASES:
                if m.group(2).startswith(start) and name not in marks:
                    marks[name] = t
    bounds = [0.0] + [marks.get(n, wall) for n, _ in PHASES[:-1]] + [wall]
    phases = {}
    t = np.array([s[0] for s in samples] or [0.0])
    pss = np.array([s[1] for s in samples] or [0])
    cpu = np.array([s[2] for s in samples] or [0.0])
    for (name, _), a, b in zip(PHASES, bounds[:-1], bounds[1:]):
        sel = (t >= a) & (t <= b)
        i0 = max(int(np.searchsorted(t, a)) - 1, 0)
        i1 = min(int(np.searchsorted(t, b, "right")) - 1, len(t) - 1)
        phases[name] = {"wall": b - a, "cpu": float(cpu[i1] - cpu[i0]),
                        "peak": int(pss[sel].max()) if sel.any() else 0}
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime - before.ru_utime - before.ru_stime,
            "peak": int(pss.max()),
            "phases": phases}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6,1e7", help="event counts, comma-separated")
    ap.add_argument("--repeat", type=int, default=1, help="analyses per size (medians)")
    ap.add_argument("--keep", help="write the runs here and keep them (default: a temporary "
                    "folder, removed)")
    a = ap.parse_args(argv)
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="analysis-speed-"))
    try:
        for size in (float(x) for x in a.sizes.split(",")):
            d = base / f"run{int(size)}"
            if d.exists():
                shutil.rmtree(d)
            t = time.perf_counter()
            info = synth_run(d, size)
            print(f"{info['events']:,} events, {info['pebbles']:,} pebbles, "
                  f"{info['samples']:,} memory samples ({info['steps']:,} steps, 4 ranks), "
                  f"{info['bytes'] / 1e6:,.0f} MB on disk "
                  f"({info['bytes'] / (info['events'] + info['pebbles']):.1f} B per event or "
                  f"pebble): written in {time.perf_counter() - t:.1f} s", flush=True)
            res, mem = [], []   # timed without PSS sampling; then the memory, sampled
            for i in range(a.repeat):
                for into, pss_too in ((res, False), (mem, True)):
                    out = d / f"analysis{i}"
                    into.append(measure(d, out, pss_too))
                    shutil.rmtree(out, ignore_errors=True)
            med = lambda f, rs=res: statistics.median(f(r) for r in rs)   # noqa: E731
            n = info["events"]
            for name, _ in PHASES:
                print(f"  {name:<10} {med(lambda r: r['phases'][name]['wall']):7.2f} s wall  "
                      f"{med(lambda r: r['phases'][name]['cpu']):7.2f} s cpu  peak "
                      f"{med(lambda r: r['phases'][name]['peak'], mem) / 2**20:7.0f} MiB")
            print(f"  {'end to end':<10} {med(lambda r: r['wall']):7.2f} s wall  "
                  f"{med(lambda r: r['cpu']):7.2f} s cpu  peak "
                  f"{med(lambda r: r['peak'], mem) / 2**20:7.0f} MiB   "
                  f"{med(lambda r: r['wall']) / n * 1e6:.2f} s per million events "
                  f"[python -m analysis.pebble --format png]", flush=True)
            if not a.keep:
                shutil.rmtree(d)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
