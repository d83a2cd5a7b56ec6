"""The seed's two lessons as one command: run the correct pipeline and both ablations, then draw.

    python -m experiments.lessons [--ranks 2] [--out DIR] [key=value ...]

Runs `deep_mlp`, `no_requires_grad` and `no_detach` (same model, seed and steps; one mpirun
each), then writes into DIR (default results/lessons-<timestamp>):
- lesson_requires_grad.{png,pdf}: loss, and each stage's weight-update norm, per step;
- lesson_detach.{png,pdf}: activations held and process memory at the end of every step;
and prints the numbers that make each lesson (computed by analysis.lessons). See docs/lessons.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from analysis import lessons
from harness.ops.launch import launch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.lessons",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", help="output folder (must not exist)")
    ap.add_argument("overrides", nargs="*", help="key=value for all three runs")
    a = ap.parse_args(argv)
    out = Path(a.out or f"results/lessons-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=False)  # never into an existing folder

    runs = {}
    for exp in lessons.RUNS:
        print(f"running {exp} on {a.ranks} ranks ...", flush=True)
        runs[exp] = launch(a.ranks, [f"exp={exp}", "run.save_weights=true", *a.overrides],
                           out / exp)
    numbers = lessons.figures(runs, out)
    for line in lessons.describe(numbers):
        print(line)
    print(f"figures in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
