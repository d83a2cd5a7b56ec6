"""What tracing costs, measured two ways in one invocation.

    python -m benchmarks.overhead [--pairs 5] [--steps 40] [--ranks 2] [key=value ...]
    python -m benchmarks.overhead runtime=torch schedule=1f1b pipeline.microbatches=4 ...

With `runtime=torch` it measures our instrument on PyTorch's pipeline (harness.torchpipe): in
1., the whole model as a one-rank PyTorch schedule of the config's class (gloo, world of one),
with the Probe and traced against PyTorch's objects untouched; in 2., `torchrun` runs.

1. Interleaved, in one process: the whole model of the config (the MLP by default, `exp=gpt` for
   the GPT, any model.factory), with the thread count one of `--ranks` ranks gets, built twice —
   traced (per-block spans and backward tensor hooks, pebble and sub-module hooks, memory
   sampler thread, trace files) and untraced — stepping alternately. Both see the same machine
   state, so the ratio isolates the instrumentation's own cost. Repeated on a tiny copy (MLP
   width 64; GPT d=32, seq 16), where compute is small, it gives the absolute cost per step.
2. Real runs: `mpirun -n 2 python -m harness.run` traced and untraced, alternating, `--pairs`
   times; the median of the per-pair ratios of median step times. This is the issue's figure;
   on a shared 2-core machine run-to-run noise (several %) dominates it.
Goal (issue 3): traced/untraced <= 1.02 with per-layer pebbles on. Also prints trace bytes/step.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import dir_bytes, launch, median_step_time
from harness import config
from harness import schedule as S
from harness.core import stage
from harness.core.executor import StageExecutor
from harness.core.sgd import SGD
from harness.ops import malloc
from harness.trace import clock, open_trace


def interleaved(steps: int, overrides: list[str], ranks: int) -> tuple[float, float, float]:
    """(median traced step, median untraced step, median per-step ratio), seconds."""
    cfg, sched = config.load_with_schedule(overrides, world_size=1)
    # the threads one rank of a `ranks`-rank run gets on this host
    torch.set_num_threads(cfg.threads or max(1, config.cores_available() // ranks))
    malloc.apply(cfg.malloc)   # as harness.run does
    rows = cfg.data.batch_size // cfg.pipeline.microbatches
    # the whole model (any model.name / factory) as a one-rank pipeline: forward, loss,
    # backward, SGD step, with every hook the harness installs; no MPI

    def make(traced: bool, tmp: Path):
        st = stage.build(cfg, 0, sched.placement, rows)
        opt = SGD(st.layers.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
        clk = clock.Clock()
        tracker, tracer, sampler, _ = open_trace(
            traced, tmp, 0, clock.HostTimer(clk), clk.now, st.layers.parameters(),
            torch.device("cpu"), cfg.trace.sample_interval_ms / 1000)
        if sampler:
            sampler.start()
        ex = StageExecutor(st, sched, 0, p2p=None, tracer=tracer, tracker=tracker,
                           optimizer=opt, device=torch.device("cpu"), pipeline=cfg.pipeline,
                           train=cfg.train, trace=cfg.trace,
                           autocast=lambda: stage.autocast(cfg))
        return ex, tracer, sampler

    with tempfile.TemporaryDirectory() as tmp:
        runners = {True: make(True, Path(tmp)), False: make(False, Path(tmp))}
        # every microbatch of the step (naive when pipeline.microbatches=1)
        actions = S.build("gpipe", 1, cfg.pipeline.microbatches)[0]
        times = {True: [], False: []}
        for i in range(steps):
            for traced in ((True, False) if i % 2 else (False, True)):
                ex, tracer, _ = runners[traced]
                t0 = time.perf_counter()
                ex.run_step(i, actions)
                tracer.flush()
                times[traced].append(time.perf_counter() - t0)
        for ex, tracer, sampler in runners.values():
            if sampler:
                sampler.stop()
            tracer.close()
    tr, un = times[True][2:], times[False][2:]  # the first steps warm the allocator
    return (statistics.median(tr), statistics.median(un),
            statistics.median(a / b for a, b in zip(tr, un)))


def interleaved_torch(steps: int, overrides: list[str], ranks: int):
    """`interleaved` for runtime=torch: two TorchWorkers of the whole model on one rank (a gloo
    world of one), one recording through the Probe and one with PyTorch's objects untouched
    (trace.enabled=false), stepping alternately."""
    # here, not at the top: torch.distributed and the pipelining runtime, for runtime=torch only
    import torch.distributed as dist

    from harness.torchpipe.dist import DistComm
    from harness.torchpipe.worker import TorchWorker
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        comm = DistComm()
        workers = {}
        with tempfile.TemporaryDirectory() as tmp:
            for traced in (True, False):
                cfg, sched = config.load_with_schedule(
                    [*overrides, f"trace.enabled={str(traced).lower()}"], world_size=1)
                # the threads one rank of a `ranks`-rank run gets on this host
                cfg.threads = cfg.threads or max(1, config.cores_available() // ranks)
                workers[traced] = w = TorchWorker(cfg, sched, 0, print, comm)
                w.open(Path(tmp) / str(traced))
                w.start()
            times = {True: [], False: []}
            for i in range(steps):
                for traced in ((True, False) if i % 2 else (False, True)):
                    times[traced].append(workers[traced].step(i)[1])
            for w in workers.values():
                w.close()
    finally:
        dist.destroy_process_group()
    tr, un = times[True][2:], times[False][2:]
    return (statistics.median(tr), statistics.median(un),
            statistics.median(a / b for a, b in zip(tr, un)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5, help="traced/untraced run pairs (default 5)")
    ap.add_argument("--steps", type=int, default=40, help="interleaved steps per variant")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="harness key=value overrides for both variants")
    a = ap.parse_args(argv)

    torch_runtime = config.load(a.overrides, world_size=a.ranks).runtime == "torch"
    measure = interleaved_torch if torch_runtime else interleaved
    tr, un, ratio = measure(a.steps, a.overrides, a.ranks)
    print(f"1. interleaved in one process (whole model, threads of 1 of {a.ranks} ranks, "
          f"{a.steps} steps each): traced {tr * 1e3:.1f} ms, untraced {un * 1e3:.1f} ms, median "
          f"ratio {ratio:.3f}", flush=True)
    # The same with a tiny model, where compute is small and the instrumentation's absolute
    # cost per step (a fixed number of hooks, spans and rows per block) stands out of the noise.
    gpt = config.load(a.overrides, world_size=a.ranks).model.name == "gpt"
    tiny = ["gpt.d=32", "gpt.heads=2", "gpt.seq=16"] if gpt else ["model.width=64"]
    tr64, un64, _ = measure(5 * a.steps, [*a.overrides, *tiny], a.ranks)
    cost = tr64 - un64
    print(f"   absolute cost per step (tiny copy, {' '.join(tiny)}, {5 * a.steps} steps): "
          f"{cost * 1e6:.0f} us "
          f"= {cost / un:.2%} of the untraced step above, i.e. expected ratio "
          f"{1 + cost / un:.3f}", flush=True)

    ratios, bytes_per_step = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.pairs):
            times = {}
            # alternate which goes first, so a machine that slows down over time favours neither
            for traced in (("true", "false") if i % 2 == 0 else ("false", "true")):
                d = launch(a.ranks, [*a.overrides, f"trace.enabled={traced}"],
                           Path(tmp) / f"{i}-{traced}")
                times[traced] = median_step_time(d)
                if traced == "true":
                    steps = (sum(1 for _ in open(d / "stats.csv")) - 1) / a.ranks
                    bytes_per_step.append(dir_bytes(d / "trace") / steps)
            ratios.append(times["true"] / times["false"])
            print(f"   pair {i + 1}: traced {times['true'] * 1e3:6.1f} ms, untraced "
                  f"{times['false'] * 1e3:6.1f} ms, ratio {ratios[-1]:.3f}", flush=True)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"2. real runs, {a.ranks} ranks, {a.pairs} alternating pairs: median ratio "
          f"{statistics.median(ratios):.3f} (IQR {q[0]:.3f}-{q[2]:.3f})")
    print(f"goal: traced/untraced <= 1.02; trace bytes per step (all ranks): "
          f"{statistics.median(bytes_per_step) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
