"""Step time and bubble of naive, GPipe and 1F1B on the default MLP, beside theory and beside
torch.distributed.pipelining running the same model, split, data and thread count.

    python -m benchmarks.schedules [--ranks 2] [--steps 12] [--ms 1,2,4,8] [key=value ...]

For each (schedule, m) it runs ours (`mpirun -n P python -m harness.run`) and PyTorch's
(`torchrun --nproc-per-node P -m benchmarks.torch_pipe`, gloo) back to back, so both see the
same machine state, and prints the median step time (first 2 steps are warm-up), our measured
bubble (analysis.metrics) and the theory. Our naive is PyTorch's GPipe with m=1. Also checks
that both computed the same losses (they start from the same weights and data).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import launch, median_step_time


def torch_run(ranks, schedule, m, steps, overrides, out: Path) -> dict:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), f"--nproc-per-node={ranks}", "-m", "benchmarks.torch_pipe",
           schedule, str(m), str(steps), str(out), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def ours(ranks, schedule, m, steps, overrides, d: Path) -> tuple[float, float, list]:
    from analysis import load_run, metrics
    launch(ranks, [f"schedule={schedule}", f"pipeline.microbatches={m}", f"train.steps={steps}",
                   *overrides], d)
    run = load_run(d)
    s = metrics.summarize(run.events, run.pebbles, run.memory, run.meta, run.steps)
    loss = run.stats.dropna(subset=["loss"]).sort_values("step")["loss"].tolist()
    return median_step_time(d, skip=2), s["pipeline"]["bubble_measured"], loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--ms", default="1,2,4,8", help="microbatch counts for GPipe and 1F1B")
    ap.add_argument("overrides", nargs="*", help="harness key=value for both (model, batch...)")
    a = ap.parse_args(argv)
    from harness.schedule import theory
    ms = [int(x) for x in a.ms.split(",")]
    cases = [("naive", 1, "gpipe")] + [(s, m, s) for s in ("gpipe", "1f1b") for m in ms
                                       if not (s == "1f1b" and m == 1)]
    print(f"{'schedule':>8} {'m':>2} | {'ours ms':>8} {'torch ms':>8} {'ours/torch':>10} | "
          f"{'bubble':>6} {'theory':>6} | losses", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, m, peer in cases:
            d = Path(tmp) / f"{name}-{m}"
            t_ours, bubble, loss_ours = ours(a.ranks, name, m, a.steps, a.overrides, d)
            pt = torch_run(a.ranks, peer, m, a.steps, a.overrides, Path(tmp) / f"{name}-{m}.json")
            t_torch = statistics.median(pt["step_times"][2:])
            same = all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(loss_ours, pt["losses"]))
            print(f"{name:>8} {m:>2} | {t_ours * 1e3:8.1f} {t_torch * 1e3:8.1f} "
                  f"{t_ours / t_torch:10.3f} | {bubble:6.1%} {theory(name, a.ranks, m)['bubble']:6.1%}"
                  f" | {'equal' if same else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    main()
