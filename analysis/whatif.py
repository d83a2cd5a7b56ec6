"""python -m analysis.whatif RUN [key=value ...] [--scale rank=R,kind=K,factor=F ...]

Predict what a measured run would cost with another schedule, microbatch count or a faster or
slower stage: the run's costs are calibrated per stage, action kind and microbatch size
(analysis/calibrate.py), the new schedule (harness.schedule.build) is replayed through
harness.simulate with them, and the predicted step time, bubble and peak activations are printed
beside the run's measured ones. The predicted timeline is drawn under the measured one
(whatif-<what>.png) and the numbers written to whatif-<what>.json, in RUN/analysis by default.

Keys: schedule (naive|gpipe|1f1b|interleaved|zb_h1|zbv: chunks per rank as in the run),
pipeline.microbatches (or m), pipeline.overlap, data.batch_size. --scale multiplies the compute
time of one stage (rank=all for every stage) and action kind (fwd, bwd, bwd_in, bwd_w, opt or
all) by factor: 0.8 = 20 % faster. --also RUN2 calibrates on
more runs of the same model (two microbatch sizes fit a + b·rows instead of assuming it).
Exit status: 0 done, 2 a bad argument or not a run (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.calibrate import KINDS, Calibration, calibrate
from analysis.pages import small_pages
from harness import schedule as S
from harness.schedule.simulate import simulate

KEYS = {"schedule": "schedule", "pipeline.microbatches": "m", "m": "m",
        "pipeline.overlap": "overlap", "data.batch_size": "batch"}


@dataclass
class Scale:
    """Multiply the compute time of `rank` (None: every rank) and `kind` (None: all) by factor."""
    rank: int | None
    kind: str | None
    factor: float

    def applies(self, rank: int, kind: str) -> bool:
        return (self.rank is None or self.rank == rank) and (self.kind is None or self.kind == kind)


@dataclass
class Prediction:
    schedule: str
    m: int
    rows: int
    overlap: bool
    step_s: float                 # span: first compute start to last compute end, all ranks
    bubble: float                 # mean over ranks of (span - compute) / span
    idle: list                    # per rank, the idle share
    peak_act_bytes: list          # per rank: bytes per microbatch x most microbatches in flight
    frame: pd.DataFrame           # rank, kind, mb, start, end (s): compute without its gap
    latency_s: float
    protocol: str


def predict(cal: Calibration, schedule: str, m: int, batch: int | None = None,
            overlap: bool = False, scales=(), protocol: str | None = None,
            virtual: int | None = None) -> Prediction:
    """The step of `schedule` with m microbatches of batch/m rows, on the calibrated costs.
    virtual: chunks per rank (default the calibration run's); a chunk's actions cost what that
    chunk's cost in the calibration run (calibrate with the same placement)."""
    batch = batch or cal.batch
    if batch % m:
        raise ValueError(f"pipeline.microbatches={m}: must divide data.batch_size={batch}")
    rows = batch // m
    sched = S.build(schedule, cal.p, m, overlap, virtual=cal.virtual if virtual is None
                    else virtual)
    nxt = {}                      # (rank, action) -> the action after it on that rank
    for r, acts in enumerate(sched):
        for a, b in zip(acts, acts[1:] + [None]):
            nxt[r, a] = b

    def factor(r, kind):
        f = 1.0
        for s in scales:
            f *= s.factor if s.applies(r, kind) else 1.0
        return f

    def cost(r, a):
        if a.kind not in KINDS:
            return 0.0
        t = cal.gap.get(r, 0.0) + cal.cost("wall", r, a.kind, rows, a.chunk) * factor(r, a.kind)
        after = nxt[r, a]
        if after is not None and after.kind not in KINDS:
            t += cal.gap_comm.get(r, 0.0)   # the executor's time before its next MPI call
        return t

    lat = cal.message_s(rows)
    proto = protocol or cal.protocol
    ops = simulate(sched, cost, lat, protocol=proto)
    fr = pd.DataFrame([(o.rank, o.kind, o.mb, o.start, o.end, o.chunk) for o in ops],
                      columns=["rank", "kind", "mb", "start", "end", "chunk"])
    comp = fr["kind"].isin(KINDS).to_numpy()
    # compute proper starts after the executor's gap (drawn and counted as idle)
    fr.loc[comp, "start"] += fr.loc[comp, "rank"].map(cal.gap).fillna(0.0)
    fr.loc[comp, "end"] = fr.loc[comp, "start"] + [
        cal.cost("wall", r, k, rows, c) * factor(r, k) for r, k, c in
        zip(fr.loc[comp, "rank"], fr.loc[comp, "kind"], fr.loc[comp, "chunk"])]
    c = fr[comp]
    span = float(c["end"].max() - c["start"].min())
    busy = [sum(cal.cost("busy", r, a.kind, rows, a.chunk) * factor(r, a.kind)
                for a in acts if a.kind in KINDS) for r, acts in enumerate(sched)]
    idle = [(span - b) / span if span else 0.0 for b in busy]
    v = S.placement_of(sched).v       # a chunk-microbatch holds its chunk's share of the bytes
    share = {r: cal.chunk_share.get(r) if len(cal.chunk_share.get(r) or []) == v else [1 / v] * v
             for r in range(cal.p)}
    peak = [round(S.peak_bytes(acts, [cal.act_bytes(r, rows) * x for x in share[r]]))
            for r, acts in enumerate(sched)]
    return Prediction(schedule, m, rows, overlap, span, float(np.mean(idle)), idle, peak, fr,
                      lat, proto)


def measured(run) -> dict:
    """The run's own numbers, as analysis.pebble reports them (metrics.summarize)."""
    from analysis import metrics
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
    """key=value list -> {schedule, m, overlap, batch}, defaults from the run's meta.json."""
    sch = meta.get("schedule") or {}
    out = {"schedule": sch.get("name") or "naive", "m": int(sch.get("microbatches") or 1),
           "overlap": bool(sch.get("overlap")),
           "batch": int((meta.get("model") or {}).get("batch_size") or 0)}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or k not in KEYS:
            raise ValueError(f"{it!r}: unknown key; allowed {', '.join(KEYS)} (key=value)")
        field_ = KEYS[k]
        if field_ == "schedule":
            if v not in S.SCHEDULES:
                raise ValueError(f"schedule={v!r}: allowed {', '.join(S.SCHEDULES)}")
            out[field_] = v
        elif field_ == "overlap":
            if v.lower() not in ("true", "false"):
                raise ValueError(f"{k}={v!r}: allowed true, false")
            out[field_] = v.lower() == "true"
        else:
            if not v.isdigit() or int(v) < 1:
                raise ValueError(f"{k}={v!r}: must be an integer >= 1")
            out[field_] = int(v)
    if out["batch"] % out["m"]:
        raise ValueError(f"pipeline.microbatches={out['m']}: must divide "
                         f"data.batch_size={out['batch']}")
    return out


def _slug(items, scales_text) -> str:
    parts = [i.split("=", 1)[0].split(".")[-1] + "=" + i.split("=", 1)[1] for i in items]
    parts += ["scale" + s.replace("rank=", "r").replace("kind=", "").replace("factor=", "x")
              .replace(",", "") for s in scales_text]
    return "-".join(parts).replace("/", "_") or "same"


def table(meas: dict, pred: Prediction, cal: Calibration) -> str:
    ms = lambda x: "-" if x is None else f"{x * 1e3:.2f} ms"
    mib = lambda x: "-" if x is None else f"{x / 2**20:.3f} MiB"
    lines = [f"{'':<26}{'measured':>16}{'predicted':>16}",
             f"{'step time':<26}{ms(meas['step_s']):>16}{ms(pred.step_s):>16}",
             f"{'bubble':<26}{meas['bubble'] * 100:>15.1f}%{pred.bubble * 100:>15.1f}%"]
    for r, (a, b) in enumerate(zip(meas["peak_act_bytes"], pred.peak_act_bytes)):
        lines.append(f"{f'peak activations r{r}':<26}{mib(a):>16}{mib(b):>16}")
    lines.append(f"predicted: {pred.schedule}, m={pred.m} ({pred.rows} rows per microbatch), "
                 f"overlap={pred.overlap}, {pred.protocol} messages of "
                 f"{pred.latency_s * 1e6:.0f} µs")
    return "\n".join(lines + cal.notes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.whatif",
                                 description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="measured run directory")
    ap.add_argument("overrides", nargs="*", help="key=value: " + ", ".join(KEYS))
    ap.add_argument("--scale", action="append", default=[], metavar="rank=R,kind=K,factor=F")
    ap.add_argument("--also", action="append", default=[], metavar="RUN",
                    help="another run of the same model to calibrate on")
    ap.add_argument("--protocol", choices=("auto", "eager", "rendezvous"), default="auto",
                    help="message model (auto: what the calibration run showed)")
    ap.add_argument("--out", help="output folder (default RUN/analysis)")
    ap.add_argument("--format", default="png", help="figure formats, comma-separated")
    ap.add_argument("--json", action="store_true", help="print the prediction as JSON")
    a = ap.parse_args(argv)
    small_pages()
    from analysis.load import RunFormatError, load_run

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2
    try:
        runs = [load_run(p) for p in [a.run] + a.also]
        scales = [parse_scale(s) for s in a.scale]
        ov = parse_overrides(a.overrides, runs[0].meta)
    except (RunFormatError, ValueError) as e:
        return fail(e)
    if any(r.events.empty for r in runs):
        return fail(f"{a.run}: no events to calibrate on")
    p = runs[0].world_size
    for s in scales:
        if s.rank is not None and not 0 <= s.rank < p:
            return fail(f"--scale rank={s.rank}: no such rank in a run of {p} ranks")
    try:
        cal = calibrate(runs)
        pred = predict(cal, ov["schedule"], ov["m"], ov["batch"], ov["overlap"], scales,
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
                         "overlap": pred.overlap, "step_s": pred.step_s, "bubble": pred.bubble,
                         "idle_per_rank": pred.idle, "peak_act_bytes": pred.peak_act_bytes,
                         "latency_s": pred.latency_s, "protocol": pred.protocol},
           "notes": cal.notes}
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    if a.json:
        print(json.dumps(res["predicted"]))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis import style
    from analysis.plots.whatif import measured_and_predicted
    steps = meas["steady"][-1:] or runs[0].steps[-1:]
    with plt.rc_context(style.RC):
        fig, _ = measured_and_predicted(runs[0].events, steps, pred.frame,
                                        f"predicted: {pred.schedule}, m={pred.m}, "
                                        f"{pred.step_s * 1e3:.1f} ms, bubble "
                                        f"{pred.bubble * 100:.0f} %"
                                        + (f"; scaled {', '.join(a.scale)}" if a.scale else ""),
                                        measured_title=f"measured: {a.run}, step {steps[-1]} "
                                        f"(median step {meas['step_s'] * 1e3:.1f} ms)")
        style.save(fig, out, name, [f for f in a.format.split(",") if f])
    print(out / f"{name}.{a.format.split(',')[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
