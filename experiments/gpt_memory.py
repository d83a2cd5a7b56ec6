"""GPT activation memory: measured against theory, and the recomputation trade-off.

    python -m experiments.gpt_memory [--out DIR] [--ranks 2] [--steps 8] [key=value ...]

Writes into DIR (default results/gpt-memory-<timestamp>):
- gpt_memory_formula.{png,pdf}: one block's saved bytes over sequence length and width,
  measured by the harness's pebble tracker, beside the hand derivation and Korthikanti et al.
  2022 (analysis/gpt_memory.py), and formula.csv with the numbers;
- gpt_recompute.{png,pdf}: peak activation bytes against step time for
  pipeline.recompute=none|attention|full, from three real `exp=gpt` runs (one mpirun each), and
  tradeoff.csv.
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

from analysis import gpt_memory as gm  # noqa: E402
from analysis import load_run, style  # noqa: E402
from harness.ops.launch import launch  # noqa: E402

B, HEADS = 4, 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.gpt_memory",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (must not exist)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("overrides", nargs="*", help="key=value for the three exp=gpt runs")
    a = ap.parse_args(argv)
    out = Path(a.out or f"results/gpt-memory-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=False)  # never into an existing folder
    table = gm.measure(b=B, heads=HEADS)
    table.to_csv(out / "formula.csv", index=False)
    exact = bool((table["measured"] == table["derived"]).all())
    print(f"one block, {len(table)} shapes: measured == derived for all: {exact}")
    runs = {}
    for mode in ("none", "attention", "full"):
        print(f"running exp=gpt pipeline.recompute={mode} on {a.ranks} ranks ...", flush=True)
        runs[mode] = load_run(launch(a.ranks, ["exp=gpt", f"pipeline.recompute={mode}",
                                               f"train.steps={a.steps}", "quiet=true",
                                               *a.overrides], out / f"recompute-{mode}"))
    trade = gm.tradeoff_table(runs)
    trade.to_csv(out / "tradeoff.csv", index=False)
    print(trade.to_string(index=False))
    with plt.rc_context(style.RC):
        style.save(gm.plot(table, B, HEADS)[0], out, "gpt_memory_formula", ("png", "pdf"))
        style.save(gm.plot_tradeoff(trade)[0], out, "gpt_recompute", ("png", "pdf"))
    print(f"figures in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
