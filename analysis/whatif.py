"""python -m analysis.whatif RUN [key=value ...] [--scale rank=R,kind=K,factor=F ...] [--also RUN2]

Predict what a measured run would cost with another schedule, microbatch count, split, world
size, recomputation, or a faster or slower stage: the run's steady steps are calibrated
(analysis/predict/calibrate.py: per block and action kind, per transition between actions, per
message), each is replayed through harness.simulate in the new configuration
(analysis/predict/replay.py), and the median of those predicted steps is printed beside the run's
measured numbers with the bubble and the peak activations. The predicted timeline is drawn
under the measured one (whatif-<what>.png) and the numbers written to whatif-<what>.json, in
RUN/analysis by default. Everything the prediction had to assume rather than read from the
given runs is printed under "assumed". Options and key=value overrides go in any order.
Exit status: 0 done, 2 a bad argument or not a run (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

from analysis import metrics, style  # noqa: E402
from analysis.dims import figure_formats  # noqa: E402
from analysis.pages import small_pages  # noqa: E402
from analysis.plots.whatif import measured_and_predicted  # noqa: E402
from analysis.predict import target  # noqa: E402
from analysis.predict.calibrate import KINDS, Calibration, calibrate  # noqa: E402
from analysis.predict.replay import Prediction, Scale, predict  # noqa: E402
from analysis.read.load import RunFormatError, load_run  # noqa: E402

__all__ = ["main", "measured", "parse_scale", "parse_overrides", "predict", "Scale",
           "Prediction", "table", "what_if"]

KEYS = target.KEYS
WHAT_IFS = """what-ifs (keys combine; options and keys in any order):
  another microbatch count     python -m analysis.whatif RUN m=8
  another schedule             python -m analysis.whatif RUN schedule=1f1b m=8
  zero bubble (B and W split)  python -m analysis.whatif RUN schedule=zb_h1
  chunks per rank              python -m analysis.whatif RUN schedule=interleaved pipeline.virtual=2
  overlap on                   python -m analysis.whatif RUN pipeline.overlap=true
  another split                python -m analysis.whatif RUN pipeline.split=[5,3]
  split balanced by time       python -m analysis.whatif RUN pipeline.balance=time
  more or fewer ranks          python -m analysis.whatif RUN ranks=4
  a pipeline from one process  python -m analysis.whatif ONE_PROCESS_RUN ranks=2 schedule=gpipe m=4
  recomputation (GPT)          python -m analysis.whatif RUN pipeline.recompute=full
  another batch size           python -m analysis.whatif RUN data.batch_size=512
  a faster or slower stage     python -m analysis.whatif RUN --scale rank=1,kind=fwd,factor=0.8
  calibrate on more runs       python -m analysis.whatif RUN --also RUN2 schedule=gpipe

keys: schedule (naive|gpipe|1f1b|interleaved|zb_h1|zbv|dualpipev), m or pipeline.microbatches,
pipeline.overlap (true|false), pipeline.split ([blocks per stage]), pipeline.balance
(params|time), pipeline.virtual (chunks per rank), ranks, pipeline.recompute (none|full|
attention), data.batch_size. Defaults: the run's own. --scale multiplies the compute time of one
stage (rank=all: every stage) and action kind (fwd, bwd, bwd_in, bwd_w, opt or all) by factor
(0.8 = 20 % faster). --also RUN2 calibrates on more runs of the same model (two microbatch
sizes fit a line in rows where the runs have no set-up block times).
Other microbatch counts are scaled with each block's set-up times (meta.json
ranks[r].block_times); another split, world size or recomputation takes the activation bytes
from the harness's formulas for the built-in models (the MLP, the GPT).
"""


def measured(run) -> dict:
    """The run's own numbers, as analysis.pebble reports them (metrics.summarize)."""
    s = metrics.summarize(run.events, run.pebbles, run.memory, run.meta,
                          run.steps or sorted(run.events["step"].unique()))
    return {"step_s": s["pipeline"]["step_span_s"], "bubble": s["pipeline"]["bubble_measured"],
            "peak_act_bytes": [r["peak_act_bytes"] for r in s["per_rank"]],
            "steady": s["steps"]["steady"]}


def parse_scale(text: str) -> Scale:
    """'rank=1,kind=fwd,factor=0.8' -> Scale; ValueError naming what is wrong."""
    f = {}
    for part in text.split(","):
        k, eq, v = part.partition("=")
        if not eq or k.strip() not in ("rank", "kind", "factor"):
            raise ValueError(f"--scale {text!r}: expected rank=R,kind=K,factor=F "
                             f"(rank a number or all, kind {'|'.join(KINDS)}|all)")
        f[k.strip()] = v.strip()
    if "factor" not in f:
        raise ValueError(f"--scale {text!r}: factor=F is required")
    try:
        factor = float(f["factor"])
    except ValueError:
        raise ValueError(f"--scale {text!r}: factor={f['factor']!r} is not a number") from None
    if not np.isfinite(factor) or factor < 0:
        raise ValueError(f"--scale {text!r}: factor must be a finite number >= 0")
    kind = f.get("kind", "all")
    if kind not in KINDS + ("all",):
        raise ValueError(f"--scale {text!r}: kind={kind!r}; allowed {', '.join(KINDS)}, all")
    rank = f.get("rank", "all")
    if rank != "all" and not rank.lstrip("-").isdigit():
        raise ValueError(f"--scale {text!r}: rank={rank!r} is not a rank number or all")
    return Scale(None if rank == "all" else int(rank), None if kind == "all" else kind, factor)


def parse_overrides(items, meta: dict) -> dict:
    """key=value list -> the what-if's settings (analysis.predict.target.parse), defaults from the
    run's meta.json; ValueError naming the key and what is allowed."""
    return target.parse(items, meta)


def _slug(items, scales_text) -> str:
    parts = [i.split("=", 1)[0].split(".")[-1] + "=" + i.split("=", 1)[1] for i in items]
    parts += ["scale" + s.replace("rank=", "r").replace("kind=", "").replace("factor=", "x")
              .replace(",", "") for s in scales_text]
    return "-".join(parts).replace("/", "_") or "same"


def what_if(runs, items=(), scales=(), protocol: str | None = None
            ) -> tuple[Calibration, Prediction]:
    """Calibrate on `runs` (loaded; the first is the one asked about) and predict it with the
    key=value `items` and Scales: the command line's work without its I/O."""
    ov = parse_overrides(items, runs[0].meta)
    cal = calibrate(runs)
    assumed = set()
    stages = ov["p"] * ov["virtual"]
    split = target.bounds(ov, runs[0].meta, stages, cal.runs[0].curves, assumed)
    cfg = target.run_config(runs[0].path, runs[0].meta)
    before = (runs[0].meta.get("schedule") or {}).get("recompute") or "none"
    share = target.recompute_share(cfg, before, ov["recompute"], assumed)
    layout = (split != cal.runs[0].split or ov["p"] != cal.p or ov["virtual"] != cal.virtual
              or ov["recompute"] != before)
    sbytes = target.stage_bytes(cfg, split, ov["batch"] // ov["m"], ov["recompute"]) \
        if layout else None
    if layout and sbytes is None:
        assumed.add("peak activations: not predicted (no formula for this model's bytes in "
                    "another split or with recomputation)")
    pred = predict(cal, ov["schedule"], ov["m"], ov["batch"], ov["overlap"], scales, protocol,
                   ov["virtual"], ov["p"], split, sbytes, share)
    pred.assumed = sorted(set(pred.assumed) | assumed)
    return cal, pred


def table(meas: dict, pred: Prediction, cal: Calibration) -> str:
    ms = lambda x: "-" if x is None else f"{x * 1e3:.2f} ms"   # noqa: E731
    mib = lambda x: "-" if x is None else f"{x / 2**20:.3f} MiB"   # noqa: E731
    lines = [f"{'':<26}{'this run':>16}{'predicted':>16}",
             f"{'step time':<26}{ms(meas['step_s']):>16}{ms(pred.step_s):>16}",
             f"{'bubble':<26}{meas['bubble'] * 100:>15.1f}%{pred.bubble * 100:>15.1f}%"]
    peaks = list(meas["peak_act_bytes"]) + [None] * (pred.p - len(meas["peak_act_bytes"]))
    for r, (a, b) in enumerate(zip(peaks, pred.peak_act_bytes)):
        lines.append(f"{f'peak activations r{r}':<26}{mib(a):>16}{mib(b):>16}")
    lines.append(f"predicted: {pred.schedule}, m={pred.m} ({pred.rows} rows per microbatch), "
                 f"{pred.p} ranks, split {[list(b) for b in pred.split]}, overlap={pred.overlap}, "
                 f"{pred.protocol} messages of {pred.latency_s * 1e6:.0f} µs; the calibration "
                 f"steps replayed gave {pred.spread[0] * 1e3:.2f}-{pred.spread[1] * 1e3:.2f} ms "
                 f"(25-75 %)")
    lines += cal.notes
    lines.append("assumed (not measured in the given runs):" if pred.assumed else
                 "assumed: nothing (every quantity was measured in the given runs)")
    lines += [f"  - {x}" for x in pred.assumed]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.whatif",
                                 description=__doc__.split("\n\n")[1], epilog=WHAT_IFS,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="measured run directory")
    ap.add_argument("overrides", nargs="*", help="key=value: " + ", ".join(KEYS))
    ap.add_argument("--scale", action="append", default=[], metavar="rank=R,kind=K,factor=F")
    ap.add_argument("--also", action="append", default=[], metavar="RUN",
                    help="another run of the same model to calibrate on")
    ap.add_argument("--protocol", choices=("auto", "eager", "rendezvous"), default="auto",
                    help="message model (auto: what the calibration run showed)")
    ap.add_argument("--out", help="output folder (default RUN/analysis)")
    ap.add_argument("--format", default="png", help="figure formats, comma-separated; none: "
                    "no figure")
    ap.add_argument("--json", action="store_true", help="print the prediction as JSON")
    a = ap.parse_intermixed_args(argv)   # RUN --also RUN2 schedule=gpipe: any order
    small_pages()

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2
    try:
        fmts = figure_formats(a.format)
        runs = [load_run(p) for p in [a.run] + a.also]
        scales = [parse_scale(s) for s in a.scale]
        ov = parse_overrides(a.overrides, runs[0].meta)
    except (RunFormatError, ValueError) as e:
        return fail(e)
    if any(r.events.empty for r in runs):
        return fail(f"{a.run}: no events to calibrate on")
    for s in scales:
        if s.rank is not None and not 0 <= s.rank < ov["p"]:
            return fail(f"--scale rank={s.rank}: no such rank in a pipeline of {ov['p']} ranks")
    try:
        cal, pred = what_if(runs, a.overrides, scales,
                            None if a.protocol == "auto" else a.protocol)
    except ValueError as e:
        return fail(e)
    meas = measured(runs[0])
    print(table(meas, pred, cal))
    out = Path(a.out) if a.out else runs[0].path / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    name = "whatif-" + _slug(a.overrides, a.scale)
    res = {"run": str(runs[0].path), "also": a.also, "overrides": a.overrides, "scale": a.scale,
           "measured": {k: v for k, v in meas.items() if k != "steady"},
           "predicted": {"schedule": pred.schedule, "microbatches": pred.m, "rows": pred.rows,
                         "ranks": pred.p, "split": [list(b) for b in pred.split],
                         "overlap": pred.overlap, "step_s": pred.step_s,
                         "step_s_25_75": list(pred.spread), "bubble": pred.bubble,
                         "idle_per_rank": pred.idle, "peak_act_bytes": pred.peak_act_bytes,
                         "latency_s": pred.latency_s, "protocol": pred.protocol},
           "assumed": pred.assumed, "notes": cal.notes}
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    if a.json:
        print(json.dumps(res["predicted"]))
    if not fmts:
        print(out / f"{name}.json")
        return 0
    steps = meas["steady"][-1:] or runs[0].steps[-1:]
    with plt.rc_context(style.RC):
        fig, _ = measured_and_predicted(runs[0].events, steps, pred.frame,
                                        f"predicted: {pred.schedule}, m={pred.m}, "
                                        f"{pred.step_s * 1e3:.1f} ms, bubble "
                                        f"{pred.bubble * 100:.0f} %"
                                        + (f"; scaled {', '.join(a.scale)}" if a.scale else ""),
                                        measured_title=f"measured: {a.run}, step {steps[-1]} "
                                        f"(median step {meas['step_s'] * 1e3:.1f} ms)")
        style.save(fig, out, name, fmts)
    print(out / f"{name}.{fmts[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
