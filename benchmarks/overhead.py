"""What tracing costs: the default experiment traced and untraced, alternating, in one invocation.

    python -m benchmarks.overhead [--pairs 3] [--ranks 2] [key=value ...]

Prints each run's median step time, the median traced/untraced ratio over the pairs, and trace
bytes per step. Goal (issue 3): ratio <= 1.02 with per-layer pebbles on. Timings on a shared
machine are noisy: alternating the two and taking medians of ratios keeps drift out of the
comparison. Runs are written under a temporary directory and deleted.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import dir_bytes, launch, median_step_time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="traced/untraced pairs (default 3)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="harness key=value overrides for both variants")
    a = ap.parse_args(argv)
    ratios, bytes_per_step = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.pairs):
            times = {}
            # alternate which goes first, so a machine that slows down over time favours neither
            order = ("true", "false") if i % 2 == 0 else ("false", "true")
            for traced in order:
                d = launch(a.ranks, [*a.overrides, f"trace.enabled={traced}"],
                           Path(tmp) / f"{i}-{traced}")
                times[traced] = median_step_time(d)
                if traced == "true":
                    steps = sum(1 for _ in open(d / "stats.csv")) - 1
                    bytes_per_step.append(dir_bytes(d / "trace") / (steps / a.ranks))
            ratios.append(times["true"] / times["false"])
            print(f"pair {i + 1}: traced {times['true'] * 1e3:7.1f} ms  untraced "
                  f"{times['false'] * 1e3:7.1f} ms  ratio {ratios[-1]:.3f}", flush=True)
    print(f"median traced/untraced step-time ratio: {statistics.median(ratios):.3f} "
          f"(goal <= 1.02; {a.pairs} pairs, {a.ranks} ranks)")
    print(f"trace bytes per step: {statistics.median(bytes_per_step) / 1024:.1f} KiB (all ranks)")


if __name__ == "__main__":
    main()
