"""How right is the what-if? `python -m benchmarks.whatif_accuracy [--dir DIR] [--reuse]`

Runs real pipelines (an 8 x 512 MLP, batch 256, one thread per rank, 2 ranks unless said):
naive m=1, GPipe and 1F1B with m in {1, 2, 4, 8}, GPipe m=4 with a straggler (rank 1 sleeps
debug.slow_ms in every block's forward and backward), and the configurations the questions
below ask about: GPipe m=4 with pipeline.split=[5,3] and with overlap, ZB-H1 m=4, the model in
one process, and a small GPT (1F1B m=4: balanced by parameters, by time, with recomputation
full and attention). Each runs --repeats times, round-robin; a configuration's measured step
time, bubble and peaks are the medians over its repeats (analysis.metrics: the median over
steady steps of the step span, the bubble and the per-rank peak activation bytes).

1. The schedule table: calibrated on --calibrate (all its repeats), analysis.whatif predicts
   every MLP configuration; it prints each signed error, their median and how many are too
   long and too short (a bias shows at a glance), the median |error|, and each calibration
   repeat predicted from itself alone (the model must reproduce what it was calibrated on).
   The straggler is predicted with --scale: the sleep per block as it really lasts here (the
   mean of 200 sleeps, timed first), or with --straggler trace from the slowed runs' traces.
2. The questions users ask, each from its own calibration run against a real run: other
   microbatch counts from one naive run, another split, balance by time, a pipeline from one
   process, overlap on, recomputation, ZB-H1 from 1F1B (peak activations exact).
3. The host's noise, which bounds what the tables can show: how far the repeats of one
   configuration spread, and how far apart naive-1, gpipe-1 and 1f1b-1 measured (one
   pipeline under three names).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from analysis import load_run
from analysis.measure.windows import steady
from analysis.predict.calibrate import action_times
from analysis.whatif import Scale, measured, what_if
from benchmarks.common import launch

MODEL = ["model.layers=8", "model.width=512", "model.in_features=512", "data.batch_size=256",
         "threads=1"]
GPT = ["model.name=gpt", "gpt.layers=3", "gpt.d=64", "gpt.seq=32", "gpt.heads=4",
       "gpt.vocab=2048", "data.batch_size=16", "threads=1", "schedule=1f1b",
       "pipeline.microbatches=4"]
SLOW = ("gpipe", 4, 1, 2.0)      # schedule, m, slow rank, slow_ms
SCHEDULES = [("naive", 1)] + [(s, m) for s in ("gpipe", "1f1b") for m in (1, 2, 4, 8)]
# name -> (ranks, arguments)
CONFIGS = {f"{s}-{m}": (2, MODEL + [f"schedule={s}", f"pipeline.microbatches={m}"])
           for s, m in SCHEDULES}
CONFIGS.update({
    "slow": (2, MODEL + [f"schedule={SLOW[0]}", f"pipeline.microbatches={SLOW[1]}",
                         f"debug.slow_rank={SLOW[2]}", f"debug.slow_ms={SLOW[3]}"]),
    "gpipe-4-split53": (2, MODEL + ["schedule=gpipe", "pipeline.microbatches=4",
                                    "pipeline.split=[5,3]"]),
    "gpipe-4-overlap": (2, MODEL + ["schedule=gpipe", "pipeline.microbatches=4",
                                    "pipeline.overlap=true"]),
    "zb_h1-4": (2, MODEL + ["schedule=zb_h1", "pipeline.microbatches=4"]),
    "one-process": (1, MODEL + ["schedule=naive"]),
    "gpt": (2, GPT),
    "gpt-time": (2, GPT + ["pipeline.balance=time"]),
    "gpt-full": (2, GPT + ["pipeline.recompute=full"]),
    "gpt-attention": (2, GPT + ["pipeline.recompute=attention"]),
})
# (question, calibrated on, key=value overrides, the real run, goal |error| or None)
QUESTIONS = [
    ("m=4 from one naive run", "naive-1", ["schedule=gpipe", "m=4"], "gpipe-4", 0.05),
    ("1F1B m=8 from one naive run", "naive-1", ["schedule=1f1b", "m=8"], "1f1b-8", 0.05),
    ("split [5,3]", "gpipe-4", ["pipeline.split=[5,3]"], "gpipe-4-split53", None),
    ("balance=time (GPT)", "gpt", ["pipeline.balance=time"], "gpt-time", None),
    ("naive from one process", "one-process", ["ranks=2"], "naive-1", 0.05),
    ("GPipe m=4 from one process", "one-process", ["ranks=2", "schedule=gpipe", "m=4"],
     "gpipe-4", 0.05),
    ("1F1B m=4 from one process", "one-process", ["ranks=2", "schedule=1f1b", "m=4"],
     "1f1b-4", 0.05),
    ("overlap on", "gpipe-4", ["pipeline.overlap=true"], "gpipe-4-overlap", None),
    ("recompute=full (GPT)", "gpt", ["pipeline.recompute=full"], "gpt-full", None),
    ("recompute=attention (GPT)", "gpt", ["pipeline.recompute=attention"], "gpt-attention",
     None),
    ("ZB-H1 from 1F1B", "1f1b-4", ["schedule=zb_h1"], "zb_h1-4", None),
]


def run_all(d: Path, steps: int, reuse: bool, repeats: int = 1, only=None) -> dict:
    """-> {config: [run dirs, one per repeat]}. Repeats go round-robin over the configurations
    (all first repeats, then all second ones...), so a drift in the machine's load spreads over
    every configuration rather than landing on a few."""
    todo = [(n, c) for n, c in CONFIGS.items() if only is None or n in only]
    out = {name: [] for name, _ in todo}
    for r in range(repeats):
        for name, (ranks, args) in todo:
            rd = d / (name if r == 0 else f"{name}.{r}")
            if not (reuse and (rd / "stats.csv").exists()):
                print(f"running {rd.name} ...", flush=True)
                launch(ranks, args + [f"train.steps={steps}"], rd, timeout=900)
            out[name].append(rd)
    return out


def sleep_length(seconds: float, n: int = 200) -> float:
    """How long time.sleep(seconds) really lasts here: the mean of n (seconds)."""
    took = []
    for _ in range(n):
        t = time.perf_counter()
        time.sleep(seconds)
        took.append(time.perf_counter() - t)
    return statistics.mean(took)


def slow_factor(pred, rank: int, added_s: float, kind: str) -> float:
    """The straggler knob as a --scale factor: the rank's `kind` action takes added_s longer,
    so (wall + added_s) / wall, wall the action as the unslowed prediction `pred` has it (the
    mean over its actions in the median step): the factor multiplies that cost, not another
    estimate of it (the calibration's pooled line in rows, through the origin for one size,
    said 2.18 ms for a backward the prediction costs 2.41 ms from the block times: the factor
    then added 10.1 ms, not the 9.1 measured)."""
    fr = pred.frame
    d = fr[(fr["rank"] == rank) & (fr["kind"] == kind)]
    w = float((d["end"] - d["start"]).mean()) if len(d) else 0.0
    return (w + added_s) / w if w else 1.0


def added_per_action(slow_runs, base_runs, rank: int, kinds=("fwd", "bwd")) -> dict:
    """Seconds the straggler knob added to one action of `rank`, per kind, as the traces show
    it: the mean action wall (first layer start to last layer end, steady steps) of the slowed
    runs less that of the same configuration without the knob. The cause, read from the
    slowed rank's own compute; what the pipeline makes of it (the step time) stays predicted."""
    def mean_wall(runs):
        acts = pd.concat([action_times(run.events, steady(run.steps)[1], run.meta)
                          for run in runs])
        acts = acts[acts["rank"] == rank]
        return {k: float(acts.loc[acts["kind"] == k, "wall"].mean()) for k in kinds}
    slow, base = mean_wall(slow_runs), mean_wall(base_runs)
    return {k: slow[k] - base[k] for k in kinds}


def noise(steps: dict) -> list[str]:
    """How well this host can judge a prediction at all, from the measured step times alone:
    steps = {config: [step seconds of each repeat]}. -> lines: the repeats' spread per
    configuration ((max - min) / median; the median and range of it over configurations), and
    the one-microbatch configurations, which are one pipeline under three names (one
    microbatch: no schedule differs), as their medians and their largest distance from their
    mean. An error below these cannot be told from the machine's own variation."""
    out = []
    spread = [(max(v) - min(v)) / statistics.median(v) for v in steps.values() if len(v) > 1]
    if spread:
        out.append(f"noise: repeats of one configuration spread by a median of "
                   f"{statistics.median(spread) * 100:.1f} % (max - min over median; "
                   f"{min(spread) * 100:.1f}-{max(spread) * 100:.1f} % over "
                   f"{len(spread)} configurations)")
    same = {k: statistics.median(v) for k, v in steps.items()
            if k in ("naive-1", "gpipe-1", "1f1b-1")}
    if len(same) > 1:
        mean = statistics.mean(same.values())
        dev = max(abs(x - mean) for x in same.values()) / mean
        out.append("noise: one pipeline under " + str(len(same)) + " names ("
                   + ", ".join(f"{k} {x * 1e3:.1f} ms" for k, x in same.items())
                   + f"): within ±{dev * 100:.1f} % of their mean")
    return out


def signed_summary(errs: dict) -> str:
    """{name: signed error} -> one line: each signed, their median, how many are too long and
    too short, and the median |error|."""
    v = list(errs.values())
    pos, neg = sum(e > 0 for e in v), sum(e < 0 for e in v)
    return (f"signed errors: {' '.join(f'{k} {e * 100:+.1f}' for k, e in errs.items())}; "
            f"median {statistics.median(v) * 100:+.1f} %; {pos} too long, {neg} too short; "
            f"median |error| {statistics.median(abs(e) for e in v) * 100:.1f} %")


def _measured(runs) -> dict:
    each = [measured(run) for run in runs]
    return {"step_s": statistics.median(x["step_s"] for x in each),
            "bubble": statistics.median(x["bubble"] for x in each),
            "steps": [x["step_s"] for x in each],
            "peaks": [[int(p) for p in x["peak_act_bytes"]] for x in each]}


def _row(name: str, me: dict, pred, err: float) -> str:
    exact = _exact(me, pred)
    peaks = " ".join(f"{a}/{b}" for a, b in zip(me["peaks"][0], pred.peak_act_bytes))
    return (f"{name:<28}{me['step_s'] * 1e3:>8.1f}ms{pred.step_s * 1e3:>8.1f}ms"
            f"{err * 100:>+8.1f}%{me['bubble'] * 100:>8.1f}%{pred.bubble * 100:>7.1f}%"
            f"  {'yes' if exact else 'NO' if exact is not None else '-':<5} {peaks}")


def _exact(me: dict, pred):
    """Do the predicted peaks equal every repeat's measured ones? None: none predicted."""
    if any(p is None for p in pred.peak_act_bytes):
        return None
    return all(list(pk) == [int(p) for p in pred.peak_act_bytes] for pk in me["peaks"])


HEAD = (f"{'config':<28}{'step meas':>10}{'pred':>10}{'err':>9}{'bubble':>9}{'pred':>8}"
        f"  exact peak act meas/pred (B) per rank")


def schedule_table(a, dirs, loaded, slept) -> tuple[dict, list]:
    """Part 1 (module docstring) -> ({config: signed error}, lines of notes)."""
    cals = a.calibrate.split(",")
    cal_runs = [loaded(x) for c in cals for x in dirs[c]]
    notes, errs, steps = [], {}, {}
    print(f"\n1. calibrated on {a.calibrate} ({len(cal_runs)} runs)\n{HEAD}")
    for name in [n for n in dirs if n in [f"{s}-{m}" for s, m in SCHEDULES] + ["slow"]]:
        runs = [loaded(x) for x in dirs[name]]
        me = _measured(runs)
        steps[name] = me["steps"]
        sch = runs[0].meta["schedule"]
        items = [f"schedule={sch['name']}", f"m={sch['microbatches']}"]
        scales = []
        if name == "slow":
            cal, plain = what_if(cal_runs, items)
            blocks = cal.blocks.get(SLOW[2], 0)
            added = ({k: blocks * slept for k in ("fwd", "bwd")} if a.straggler == "sleep" else
                     added_per_action(runs, [loaded(x) for x in dirs[f"{SLOW[0]}-{SLOW[1]}"]],
                                      SLOW[2]))
            scales = [Scale(SLOW[2], k, slow_factor(plain, SLOW[2], add, k))
                      for k, add in added.items()]
            notes += [f"straggler: rank {SLOW[2]}'s {sc.kind} {added[sc.kind] * 1e3:+.3f} ms per "
                      f"action ({a.straggler}) -> --scale factor {sc.factor:.3f}" for sc in scales]
        cal, pred = what_if(cal_runs, items, scales)
        err = (pred.step_s - me["step_s"]) / me["step_s"]
        if name not in cals:
            errs[name] = err
        print(_row(name + ("*" if name in cals else ""), me, pred, err), flush=True)
    self_errs = []
    for c in cals:
        for x in dirs[c]:
            run = loaded(x)
            pred = what_if([run])[1]
            self_errs.append((f"{c}{x.suffix}", (pred.step_s - measured(run)["step_s"])
                              / measured(run)["step_s"]))
    worst = max(abs(e) for _, e in self_errs)
    notes.insert(0, "calibration runs, each predicted from itself alone: "
                 + " ".join(f"{n} {e * 100:+.2f}%" for n, e in self_errs)
                 + f" (goal within 2 %: {'met' if worst <= 0.02 else 'NOT met'})")
    med, med_abs = statistics.median(errs.values()), statistics.median(map(abs, errs.values()))
    notes.insert(1, signed_summary(errs) + f" (goals: median within ±1.5 %: "
                 f"{'met' if abs(med) <= 0.015 else 'NOT met'}; median |error| <= 3 %: "
                 f"{'met' if med_abs <= 0.03 else 'NOT met'})")
    return steps, notes


def questions(dirs, loaded) -> list:
    """Part 2 (module docstring) -> lines."""
    out = []
    print(f"\n2. the questions users ask, each from one calibration configuration\n{HEAD}")
    for q, src, items, real, goal in QUESTIONS:
        if src not in dirs or real not in dirs:
            continue
        cal_runs = [loaded(x) for x in dirs[src]]
        _, pred = what_if(cal_runs, items)
        split = [list(b) for b in pred.split]
        # the real runs by the split they ran (balance=time: the harness times the blocks
        # once at set-up, and on a loaded host its repeats can split differently)
        groups = {}
        for x in dirs[real]:
            groups.setdefault(str(loaded(x).meta.get("split")), []).append(x)
        for key, xs in sorted(groups.items(), key=lambda kv: kv[0] != str(split)):
            me = _measured([loaded(x) for x in xs])
            real_split = loaded(xs[0]).meta.get("split")
            p_ = pred if real_split == split else what_if(
                cal_runs, items + [f"pipeline.split={[hi - lo for lo, hi in real_split]}"])[1]
            err = (p_.step_s - me["step_s"]) / me["step_s"]
            line = _row(q if len(groups) == 1 else f"{q} {len(xs)}/{len(dirs[real])}", me, p_,
                        err)
            if goal is not None:
                line += f"  (goal {goal * 100:.0f} %: {'met' if abs(err) <= goal else 'NOT met'})"
            if real_split != split:
                line += f"  [the run's split {real_split}; the what-if's was {split}]"
            print(line + f"  <- {src} {' '.join(items)}", flush=True)
        out += [f"  {q}: assumed {x}" for x in pred.assumed]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="keep runs already in --dir")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--calibrate", default="gpipe-2",
                    help="the configuration(s) the schedule table is calibrated on, "
                         "comma-separated")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per configuration, round-robin; medians over them (default 1)")
    ap.add_argument("--straggler", choices=("sleep", "trace"), default="sleep",
                    help="the slowed rank's --scale factor from the knob's sleep as it lasts "
                         "here alone (default), or from the traces: its actions' added wall "
                         "time against the same configuration without the knob")
    ap.add_argument("--only", help="comma-separated configurations to run (default all)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.dir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        slept = sleep_length(SLOW[3] / 1e3)
        print(f"a {SLOW[3]:g} ms sleep lasts {slept * 1e3:.3f} ms here (mean of 200"
              + ("; measured now, not when reused runs ran)" if a.reuse else ")"), flush=True)
        dirs = run_all(d, a.steps, a.reuse, a.repeats,
                       a.only.split(",") if a.only else None)
        unknown = [c for c in a.calibrate.split(",") if c not in dirs]
        if unknown:
            ap.error(f"--calibrate: unknown {', '.join(unknown)}; allowed {', '.join(dirs)}")
        cache = {}

        def loaded(x):
            if x not in cache:
                cache[x] = load_run(x)
            return cache[x]
        steps, notes = schedule_table(a, dirs, loaded, slept)
        for line in notes + noise(steps):
            print(line)
        for line in questions(dirs, loaded):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
