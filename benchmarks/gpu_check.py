"""What only a GPU can verify, in one command: `python -m benchmarks.gpu_check [--out DIR]`.

Runs 2 ranks on CUDA (one GPU shared is fine: rank r uses cuda:<local rank % devices>) and
checks, writing one report (`DIR/report.md`) beside the run directories:

1. naive and 1F1B (m=4) on the MLP and the GPT train on CUDA and complete;
2. CUDA-event spans against torch.profiler's kernel times for the same steps (`trace.kineto`):
   the share of Kineto's kernel time that lies inside our compute spans (aligned clock), and
   kernel time / span time per rank;
3. NVML and caching-allocator memory samples present, and plausible against the pebbles
   (peak `cuda_allocated` >= peak live activation bytes; both below the device's memory);
4. host staging (`comm.cuda_aware=false`: d2h/h2d spans) against CUDA-aware transfers where
   MPI offers them (`mpi_memory_alloc_kinds` lists cuda), same run otherwise;
5. tracing overhead on the GPU: median step time traced / untraced;
6. pebble times on the device timeline: each pebble's store time inside a forward span of its
   microbatch on its rank.

On a machine without CUDA it says so, checks what it can (imports, the event-mapping
arithmetic), writes the report and exits 0. Exit 1 when a check fails on a GPU.
This script has not yet been run on a GPU (none was available while it was written).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path

import numpy as np

STEPS = 8
KINETO = "trace.kineto=4:5"
MODELS = {"mlp": ["model.layers=8", "model.width=1024", "data.batch_size=256"],
          "gpt": ["exp=gpt", "gpt.layers=4"]}
SCHEDULES = {"naive": ["schedule=naive"], "1f1b": ["schedule=1f1b", "pipeline.microbatches=4"]}


class Report:
    def __init__(self):
        self.rows, self.notes = [], []

    def check(self, name: str, ok: bool | None, detail: str):
        self.rows.append((name, {True: "PASS", False: "FAIL", None: "SKIP"}[ok], detail))

    def failed(self) -> bool:
        return any(s == "FAIL" for _, s, _ in self.rows)

    def markdown(self, title: str) -> str:
        lines = [f"# {title}", "", *self.notes, "", "| check | result | detail |",
                 "|---|---|---|"]
        lines += [f"| {n} | {s} | {d} |" for n, s, d in self.rows]
        return "\n".join(lines) + "\n"


def _launch(out: Path, name: str, args: list[str]) -> Path:
    from harness.ops.launch import launch
    return launch(2, ["device=cuda", f"train.steps={STEPS}", *args], out / name, timeout=600)


def inside_share(spans: list, items: list) -> float:
    """Share of the total length of `items` [(a, b)] covered by the union of `spans` [(a, b)]."""
    if not items:
        return float("nan")
    s = sorted(spans)
    merged = []
    for a, b in s:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    starts = np.array([m[0] for m in merged])
    total = covered = 0.0
    for a, b in items:
        total += b - a
        i = np.searchsorted(starts, b) - 1
        while i >= 0 and merged[i][1] > a:
            covered += max(0.0, min(b, merged[i][1]) - max(a, merged[i][0]))
            i -= 1
    return covered / total if total else float("nan")


def kernels_vs_spans(run) -> list[tuple[int, float, float]]:
    """Per rank: (rank, share of kernel time inside compute spans, kernel time / span time)
    over the Kineto steps."""
    from analysis.read import kineto
    a, b = (int(x) for x in KINETO.split("=")[1].split(":"))
    ev = run.events
    out = []
    for r in range(run.world_size):
        comp = ev[(ev["rank"] == r) & (ev["lane"] == "compute") & ev["step"].between(a, b)]
        spans = list(zip(comp["start"] * 1e6, comp["end"] * 1e6))
        ks = [(e["ts"], e["ts"] + e["dur"]) for e in kineto.rank_events(run, r)
              if e.get("cat") == "kineto.kernel"]
        span_t = float((comp["end"] - comp["start"]).sum() * 1e6)
        out.append((r, inside_share(spans, ks), sum(k[1] - k[0] for k in ks) / span_t
                    if span_t else float("nan")))
    return out


def pebbles_on_device(run) -> float:
    """Share of pebbles stored inside a forward (or loss) span of their rank and microbatch."""
    ev, pb = run.events, run.pebbles
    fwd = ev[ev["kind"].isin(["fwd", "loss"])]
    ok = n = 0
    for (r, s, m), g in pb[pb["kind"] == "saved"].groupby(["rank", "step", "mb"]):
        f = fwd[(fwd["rank"] == r) & (fwd["step"] == s) & (fwd["mb"] == m)]
        lo, hi = f["start"].min() - 1e-5, f["end"].max() + 1e-5
        ok += int(g["stored"].between(lo, hi).sum())
        n += len(g)
    return ok / n if n else float("nan")


def median_step(run, skip: int = 2) -> float:
    st = run.stats
    return float(st[st["step"] >= skip]["step_time"].median())


def gpu_checks(out: Path, rep: Report) -> None:
    import torch

    from analysis import load_run
    total = torch.cuda.get_device_properties(0).total_memory
    rep.notes.append(f"GPU: {torch.cuda.get_device_name(0)} ({total / 2**30:.0f} GiB), "
                     f"{torch.cuda.device_count()} device(s); torch {torch.__version__}, "
                     f"CUDA {torch.version.cuda}")
    runs = {}
    for model, margs in MODELS.items():
        for sched, sargs in SCHEDULES.items():
            name = f"{model}-{sched}"
            try:
                runs[name] = load_run(_launch(out, name, [*margs, *sargs, KINETO]))
                rep.check(f"1. {name} trains on CUDA", runs[name].meta["status"] == "complete",
                          f"status {runs[name].meta['status']}, devices "
                          f"{[i['device'] for i in runs[name].meta['ranks']]}")
            except RuntimeError as e:
                rep.check(f"1. {name} trains on CUDA", False, str(e).splitlines()[0][:200])
    for name, run in runs.items():
        for r, share, ratio in kernels_vs_spans(run):
            rep.check(f"2. {name} rank {r}: kernels inside our spans", share >= 0.9,
                      f"{share:.1%} of kernel time inside compute spans; kernel/span time "
                      f"{ratio:.2f}")
        mem = run.memory
        peak_alloc = mem[mem["source"] == "cuda_allocated"].groupby("rank")["bytes"].max()
        nvml = mem[mem["source"].str.startswith("nvml")]
        from analysis.metrics import live_bytes
        lb = live_bytes(run.pebbles).groupby("rank")["bytes"].max()
        ok = (len(peak_alloc) == 2 and len(nvml) > 0
              and all(peak_alloc.get(r, 0) >= lb.get(r, 0) for r in range(2))
              and all(v < total for v in peak_alloc))
        rep.check(f"3. {name}: memory samples plausible", ok,
                  f"peak cuda_allocated {dict((int(k), int(v)) for k, v in peak_alloc.items())}, "
                  f"peak pebbles {dict((int(k), int(v)) for k, v in lb.items())}, "
                  f"{len(nvml)} NVML samples")
        share = pebbles_on_device(run)
        rep.check(f"6. {name}: pebbles on the device timeline", share >= 0.95,
                  f"{share:.1%} of saved pebbles stored inside their forward span")
    # 4. staging against CUDA-aware
    base = [*MODELS["mlp"], *SCHEDULES["naive"]]
    try:
        staged = load_run(_launch(out, "staged", [*base, "comm.cuda_aware=false"]))
        copies = staged.events[staged.events["kind"].isin(["d2h", "h2d"])]
        rep.check("4. host staging traced", len(copies) > 0,
                  f"{len(copies)} d2h/h2d spans, median {copies['end'].sub(copies['start']).median() * 1e6:.0f} µs")
        aware_ok = runs["mlp-naive"].meta.get("cuda_aware_mpi")
        if aware_ok:
            aware = load_run(_launch(out, "aware", [*base, "comm.cuda_aware=true"]))
            rep.check("4. CUDA-aware vs staged step time", True,
                      f"{median_step(aware) * 1e3:.1f} ms vs {median_step(staged) * 1e3:.1f} ms")
        else:
            rep.check("4. CUDA-aware transfers", None, "MPI does not list cuda in "
                      "mpi_memory_alloc_kinds (PyPI's MPICH is not CUDA-aware)")
    except RuntimeError as e:
        rep.check("4. host staging", False, str(e).splitlines()[0][:200])
    # 5. tracing overhead on the GPU
    try:
        on = load_run(_launch(out, "traced", base))
        off = load_run(_launch(out, "untraced", [*base, "trace.enabled=false"]))
        ratio = median_step(on) / median_step(off)
        rep.check("5. tracing overhead on the GPU", ratio <= 1.05,
                  f"traced / untraced median step {ratio:.3f} (one pair: noisy)")
    except RuntimeError as e:
        rep.check("5. tracing overhead", False, str(e).splitlines()[0][:200])


def cpu_checks(rep: Report) -> None:
    """What a machine without CUDA can still check."""
    import torch

    from harness.trace.clock import event_to_host_ns
    rep.notes.append(f"**No CUDA here** (torch {torch.__version__}, built with CUDA "
                     f"{torch.version.cuda}; torch.cuda.is_available() is False): the GPU checks "
                     f"1-6 were not run. Run this on a GPU machine.")
    rep.check("event mapping arithmetic", event_to_host_ns(1000, 3000, 0.5) == 502000,
              "event_to_host_ns(1000, 3000, 0.5 ms) == 502000")
    try:
        import pynvml  # noqa: F401
        rep.check("NVML bindings importable", True, "nvidia-ml-py present")
    except ImportError as e:
        rep.check("NVML bindings importable", False, str(e))
    from harness.trace.ranges import labeler
    rep.check("profiler ranges", labeler(0, torch.device("cpu")) is not None,
              "record_function ranges available (NVTX needs CUDA)")
    for name in ("1-6 GPU checks",):
        rep.check(name, None, "no CUDA")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    ap.add_argument("--out", help="output folder (default results/gpu_check-<time>)")
    a = ap.parse_args(argv)
    out = Path(a.out or f"results/gpu_check-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    import torch
    rep = Report()
    rep.notes.append(f"host {platform.node()}, {dt.datetime.now().isoformat(timespec='seconds')}")
    if torch.cuda.is_available():
        gpu_checks(out, rep)
    else:
        cpu_checks(rep)
    text = rep.markdown("GPU check (benchmarks/gpu_check.py)")
    (out / "report.md").write_text(text)
    print(text)
    print(f"report: {out / 'report.md'}")
    return 1 if rep.failed() and torch.cuda.is_available() else 0


if __name__ == "__main__":
    sys.exit(main())
