"""Our executor against PyTorch's (torch.distributed.pipelining), action by action.

    python -m benchmarks.runtimes [--pairs 3] [--steps 12] [--out DIR] [key=value ...]

Runs the config (default: the 16 x 1024 MLP, `schedule=naive`; give e.g. `schedule=1f1b
pipeline.microbatches=4`) with our executor (mpirun) and with PyTorch's class for the schedule
(`runtime=torch`, torchrun), both recorded by our instrument, `--pairs` times alternating who
goes first. Prints the median step time of each and the median per-pair ratio, and, per rank
and kind of action, the time per step (median over a run's steady steps, then over the runs)
of both and their difference (analysis.compare.action_times): where the two differ. With
`--out`, `python -m analysis.compare` of the last pair is written there (compare.png).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pandas as pd

from analysis import compare, load_run
from analysis.measure.windows import steady
from benchmarks.common import launch, median_step_time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", help="write analysis.compare of the last pair here")
    ap.add_argument("overrides", nargs="*", help="harness key=value for both")
    a = ap.parse_args(argv)
    times = {"ours": [], "torch": []}
    acts = {"ours": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.pairs):
            order = ("ours", "torch") if i % 2 == 0 else ("torch", "ours")
            dirs = {}
            for rt in order:
                d = Path(tmp) / f"{i}-{rt}"
                launch(a.ranks, [*a.overrides, f"train.steps={a.steps}", f"runtime={rt}"], d)
                run = load_run(d)
                times[rt].append(median_step_time(d, skip=2))
                acts[rt].append(compare.action_times(run.events, steady(run.steps)[1]))
                dirs[rt] = d
            print(f"pair {i + 1}: ours {times['ours'][-1] * 1e3:.1f} ms, PyTorch "
                  f"{times['torch'][-1] * 1e3:.1f} ms", flush=True)
        if a.out:
            compare.main([str(dirs["ours"]), str(dirs["torch"]), "--out", a.out])
    ratios = [x / y for x, y in zip(times["ours"], times["torch"])]
    print(f"step (median of runs): ours {statistics.median(times['ours']) * 1e3:.1f} ms, "
          f"PyTorch {statistics.median(times['torch']) * 1e3:.1f} ms; ours / PyTorch per pair "
          f"{' '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f})")
    med = {rt: pd.concat(v).groupby(["rank", "action"], as_index=False).median()
           for rt, v in acts.items()}
    print(f"A = ours, B = PyTorch's, medians over {a.pairs} runs each")
    print(compare.action_text(compare.action_table(med["ours"], med["torch"])))


if __name__ == "__main__":
    main()
