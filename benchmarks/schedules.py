"""Step time and bubble of every schedule (naive, GPipe, 1F1B, interleaved, ZB-H1, ZBV,
DualPipeV) on the default MLP, beside theory and beside torch.distributed.pipelining running the
same model, split, data and thread count.

    python -m benchmarks.schedules [--ranks 2] [--steps 12] [--ms 1,2,4,8]
                                   [--schedules naive,...,dualpipev] [--each] [key=value ...]

For each (schedule, m) it runs ours (`mpirun -n P python -m harness.run`) and PyTorch's
(`torchrun --nproc-per-node P -m benchmarks.torch_pipe`, gloo) back to back, so both see the
same machine state, `--repeats` times alternating who goes first, and prints the median step
time (first 2 steps are warm-up), the median of the per-pair ratios, our measured bubble
(analysis.metrics) split by phase (warm-up / steady / cool-down: the share of the step each
rank idles in that phase, mean over ranks; analysis/measure/phases.py) and the theory. Our naive is
PyTorch's GPipe with m=1; interleaved (pipeline.virtual=2) runs ScheduleInterleaved1F1B, zbv
ScheduleZBVZeroBubble and dualpipev ScheduleDualPipeV, all with our chunks as their stages, and
zb_h1 runs ScheduleInterleavedZeroBubble with one stage per rank (benchmarks/torch_pipe.py).
Also checks that both computed the same losses (they start from the same weights and data). `--no-peer` runs only ours (the bubble and its phases); any model works
(`model.name=gpt`, `exp=gpt`, ...).
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

from analysis import load_run, metrics
from benchmarks.common import launch, median_step_time
from harness.schedule import theory


ALL = ("naive", "gpipe", "1f1b", "interleaved", "zb_h1", "zbv", "dualpipev")
V = {"interleaved": 2, "zbv": 2, "dualpipev": 2}                     # chunks per rank each case runs with
VIRTUAL = {k: [f"pipeline.virtual={v}"] for k, v in V.items()}


def usable(name: str, p: int, m: int) -> bool:
    """Cases both sides run: 1F1B-like schedules need m >= p (below it they are GPipe), and
    interleaved needs m a multiple of p (Megatron-LM's rule; PyTorch's is looser)."""
    if name == "gpipe":
        return True
    if name == "interleaved":
        return m >= p and m % p == 0
    if name == "dualpipev":
        return m >= 2 * p
    return m >= p if name in ("zb_h1", "zbv") else m > 1


def torch_run(ranks, schedule, m, steps, overrides, out: Path, timeout: float = 900) -> dict:
    torchrun = Path(sys.executable).parent / "torchrun"
    # --standalone: a local rendezvous on a free port (two jobs never collide on 29500)
    cmd = [str(torchrun), "--standalone", f"--nproc-per-node={ranks}", "-m",
           "benchmarks.torch_pipe", schedule, str(m), str(steps), str(out), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ),
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def ours(ranks, schedule, m, steps, overrides, d: Path) -> tuple[float, float, list, list]:
    """-> (median step time, measured bubble, losses, [warm-up, steady, cool-down] idle shares)"""
    launch(ranks, [f"schedule={schedule}", f"pipeline.microbatches={m}", f"train.steps={steps}",
                   *overrides], d)
    run = load_run(d)
    s = metrics.summarize(run.events, run.pebbles, run.memory, run.meta, run.steps)
    loss = run.stats.dropna(subset=["loss"]).sort_values("step")["loss"].tolist()
    span = s["pipeline"]["step_span_s"]
    phases = [statistics.mean(r[f"idle_{ph}"] for r in s["per_rank"]) / span
              for ph in ("warmup", "steady", "cooldown")]
    return median_step_time(d, skip=2), s["pipeline"]["bubble_measured"], loss, phases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs per case (default 3)")
    ap.add_argument("--ms", default="1,2,4,8", help="microbatch counts for GPipe and 1F1B")
    ap.add_argument("--schedules", default=",".join(ALL), help=f"default {','.join(ALL)}")
    ap.add_argument("--no-peer", action="store_true", help="skip torch.distributed.pipelining")
    ap.add_argument("--each", action="store_true", help="also print every pair's ours/PyTorch "
                    "ratio, in the order run, and the ratio of each side's fastest run")
    ap.add_argument("overrides", nargs="*", help="harness key=value for both (model, batch...)")
    a = ap.parse_args(argv)
    ms = [int(x) for x in a.ms.split(",")]
    names = a.schedules.split(",")
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        ap.error(f"--schedules: unknown {', '.join(unknown)}; allowed {', '.join(ALL)}")
    cases = [("naive", 1, "gpipe")] if "naive" in names else []
    cases += [(s, m, s) for s in names if s != "naive" for m in ms if usable(s, a.ranks, m)]
    print(f"{'schedule':>11} {'m':>2} | {'ours ms':>8} {'torch ms':>8} {'ours/torch':>10} | "
          f"{'bubble':>6} {'theory':>6} | {'warm':>5} {'steady':>6} {'cool':>5} | losses   "
          f"(medians of {a.repeats} {'runs' if a.no_peer else 'back-to-back pairs'})",
          flush=True)
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        for name, m, peer in cases:
            t_o, t_t, ratios, bubbles, phases, same = [], [], [], [], [], True
            for r in range(a.repeats):
                def run_ours():
                    d = Path(tmp) / f"{name}-{m}-{r}"
                    t, b, loss, ph = ours(a.ranks, name, m, a.steps,
                                          [*a.overrides, *VIRTUAL.get(name, [])], d)
                    t_o.append(t), bubbles.append(b), phases.append(ph)
                    return loss

                if a.no_peer:
                    run_ours()
                    continue

                def run_torch():
                    pt = torch_run(a.ranks, peer, m, a.steps,
                                   [*a.overrides, *VIRTUAL.get(name, [])],
                                   Path(tmp) / f"{name}-{m}-{r}.json")
                    t_t.append(med(pt["step_times"][2:]))
                    return pt["losses"]
                # alternate who goes first, so drift in machine speed favours neither
                first, second = (run_ours, run_torch) if r % 2 == 0 else (run_torch, run_ours)
                la, lb = first(), second()
                same &= all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(la, lb))
                ratios.append(t_o[-1] / t_t[-1])
            ph = [med(p[i] for p in phases) for i in range(3)]
            peer = ((f"{med(t_t) * 1e3:8.1f} {med(ratios):10.3f}") if t_t
                    else f"{'-':>8} {'-':>10}")
            print(f"{name:>11} {m:>2} | {med(t_o) * 1e3:8.1f} {peer} | {med(bubbles):6.1%} "
                  f"{theory(name, a.ranks, m, V.get(name, 1))['bubble']:6.1%} | {ph[0]:5.1%} {ph[1]:6.1%} "
                  f"{ph[2]:5.1%} | {'-' if a.no_peer else 'equal' if same else 'DIFFER'}",
                  flush=True)
            if a.each and ratios:   # noise on a shared host only adds time: also the fastest
                print(f"{'':>14}| pairs: {' '.join(f'{x:.3f}' for x in ratios)}; fastest run "
                      f"of each side: {min(t_o) * 1e3:.1f} / {min(t_t) * 1e3:.1f} ms = "
                      f"{min(t_o) / min(t_t):.3f}", flush=True)


if __name__ == "__main__":
    main()
