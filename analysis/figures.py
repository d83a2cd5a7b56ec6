"""python -m analysis.figures SWEEP_DIR [--out DIR] [--format png,pdf] [--no-gif]

The paper's figure set from a sweep directory (experiments/sweep.py): reads sweep.csv and the
complete runs it lists, and writes into DIR (default SWEEP_DIR/figures):

  fig1_schedules       pebble graphs of naive, GPipe and 1F1B, one time scale
  fig2_bubble          bubble fraction against m, per p: measured (median, IQR) and theory
  fig3_memory          peak activation memory per stage against m: GPipe, 1F1B, theory
  fig4_breakdown       where a step's time goes, blocking vs overlapped communication
  fig7_zb_schedules    pebble graphs of 1F1B, interleaved, ZB-H1 and ZB-V, one time scale
  fig8_zb_bubble       bubble against m for every schedule, per p: measured, theory, simulated
  fig9_zb_memory       peak activation memory per stage against m for every schedule, theory
  lesson_requires_grad, lesson_detach   the two lessons (analysis.lessons)
  fig6_animation.gif   + fig6_frames/NNN.png: the animated pebble graph of one measured step
  numbers.json         the measured numbers (experiments.paper turns them into figures.md)

A figure whose runs are not in the sweep is skipped (figures.md says which and why). This is
the only module of the figure set that reads or writes files; statistics live in
analysis.sweep_stats and drawing in analysis.plots.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from analysis import lessons, load_run, metrics, style, sweep_stats  # noqa: E402
from analysis.dims import figure_formats  # noqa: E402
from analysis.metrics import steady, step_windows  # noqa: E402
from analysis.pages import small_pages  # noqa: E402
from analysis.plots import (breakdown_plot, bubble_plot, peak_memory_plot,  # noqa: E402
                            schedules_side_by_side)
from analysis.plots.animate import durations, frame_states, pebble_animation  # noqa: E402
from analysis.plots.sweep import sched_label  # noqa: E402

GIF_DPI = 120     # the GIF is for screens: ~650 px wide, 6-pt labels still legible
FRAME_EPS = 1e-4  # s: event times closer than this form one animation frame (animate.py):
# the interpreter's gap between one layer's end and the next one's start is ~30-50 µs


def load_sweep(sweep_dir) -> dict:
    """sweep.csv + the complete runs -> index, runs and ranks frames (sweep_stats) and paths."""
    d = Path(sweep_dir)
    index = pd.read_csv(d / "sweep.csv")
    runs, ranks, path, meta = [], [], {}, {}
    for row in index[index["status"] == "complete"].to_dict("records"):
        run = load_run(d / row["run_dir"])
        s = metrics.summarize(run.events, run.pebbles, run.memory, run.meta, run.steps)
        rec, rr = sweep_stats.run_records(row, run.meta, s)
        runs.append(rec)
        ranks += rr
        key = (row["point"], int(row["repeat"]))
        path[key], meta[key] = run.path, run.meta
    return {"dir": d, "index": index, "runs": pd.DataFrame(runs), "ranks": pd.DataFrame(ranks),
            "path": path, "meta": meta, "cores": int(index["cores"].max()),
            "spec": json.loads((d / "sweep.json").read_text()) if (d / "sweep.json").exists()
            else {}}


CLASSIC = ("naive", "gpipe", "1f1b")                 # figures 1-3
ZB_PANELS = ("1f1b", "interleaved", "zb_h1", "zbv")  # figure 7 (1F1B as the reference)


def _pick(sw, p, schedule, m):
    """The representative (median-span) blocking run of a point, or None."""
    r = sweep_stats.blocking(sw["runs"])
    r = r[(r["p"] == p) & (r["schedule"] == schedule) & (r["m"] == m)]
    if r.empty:
        return None
    rep = sweep_stats.representative(r).iloc[0]
    return sw["path"][(rep["point"], int(rep["repeat"]))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.figures",
                                 description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="sweep directory (holds sweep.csv)")
    ap.add_argument("--out", help="output folder (default SWEEP_DIR/figures)")
    ap.add_argument("--format", default="png,pdf", help="static figure formats, comma-separated; "
                    "none: no static figure")
    ap.add_argument("--no-gif", action="store_true", help="skip the animation (figure 6)")
    a = ap.parse_args(argv)
    small_pages()
    out = Path(a.out) if a.out else Path(a.sweep) / "figures"
    try:
        fmts = figure_formats(a.format)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        make(a.sweep, out, fmts, gif=not a.no_gif)
    except MixedSweep as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


class MixedSweep(ValueError):
    """The sweep's measuring runs are of more than one configuration (sweep_stats.CONFIG)."""


def make(sweep_dir, out, formats=("png", "pdf"), gif=True, log=None) -> dict:
    """Every figure of the set from a sweep directory (or what load_sweep returned for it);
    returns what numbers.json holds."""
    t0 = time.perf_counter()
    log = log or (lambda s: print(f"[{time.perf_counter() - t0:5.1f} s] {s}", file=sys.stderr,
                                  flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sw = sweep_dir if isinstance(sweep_dir, dict) else load_sweep(sweep_dir)
    sweep_dir = sw["dir"]
    log(f"loaded {len(sw['runs'])} complete runs of {len(sw['index'])} index rows")
    runs, ranks, cores = sw["runs"], sw["ranks"], sw["cores"]
    mixed = sweep_stats.configs(runs) if len(runs) else []
    if len(mixed) > 1:   # every figure compares schedules of one model, precision, recompute
        raise MixedSweep(f"{sweep_dir}: the runs are of {len(mixed)} configurations ("
                         + "; ".join(", ".join(f"{k}={v}" for k, v in c.items())
                                     for c in mixed)
                         + "): the figures compare schedules of one; split the sweep")
    made, skipped = {}, {}
    bub = sweep_stats.bubble_table(runs) if len(runs) else pd.DataFrame()
    mem = sweep_stats.memory_table(ranks) if len(ranks) else pd.DataFrame()
    brk = sweep_stats.breakdown_table(ranks) if len(ranks) else pd.DataFrame()

    def save(name, fig):
        made[name] = style.save(fig, out, name, formats)
        log(f"drew {name}")

    meas = sweep_stats.measurements(runs) if len(runs) else runs
    p0 = int(meas["p"].min()) if len(meas) else None
    ms = sorted(int(m) for m in meas.loc[meas["schedule"].isin(CLASSIC[1:]), "m"].unique()) \
        if len(meas) else []
    m1 = 4 if 4 in ms else (ms[-1] if ms else None)
    with plt.rc_context(style.RC):
        panels = []
        for s, m, title in (("naive", 1, "naive (m=1)"), ("gpipe", m1, f"GPipe (m={m1})"),
                            ("1f1b", m1, f"1F1B (m={m1})")):
            path = _pick(sw, p0, s, m) if m else None
            if path is not None:
                panels.append(_panel(path, title))
        if panels:
            save("fig1_schedules", schedules_side_by_side(panels)[0])
        else:
            skipped["fig1_schedules"] = "no naive/GPipe/1F1B runs"
        classic = bub[bub["schedule"].isin(CLASSIC)] if len(bub) else bub
        if len(classic):
            save("fig2_bubble", bubble_plot(classic, cores)[0])
            save("fig3_memory", peak_memory_plot(mem, cores, schedules=CLASSIC)[0])
        else:
            skipped["fig2_bubble"] = skipped["fig3_memory"] = "no schedule measurements"
        zb_panels = _zb_panels(sw, p0)
        if zb_panels:
            save("fig7_zb_schedules", schedules_side_by_side(zb_panels)[0])
        else:
            skipped["fig7_zb_schedules"] = ("no p and m with runs of 1F1B, interleaved, ZB-H1 "
                                            "and ZB-V")
        if len(bub) and bub["schedule"].isin(ZB_PANELS[1:]).any():
            save("fig8_zb_bubble", bubble_plot(bub, cores, by="schedule")[0])
            save("fig9_zb_memory", peak_memory_plot(mem, cores)[0])
        else:
            skipped["fig8_zb_bubble"] = skipped["fig9_zb_memory"] = \
                "no interleaved, ZB-H1 or ZB-V runs"
        if len(brk):
            save("fig4_breakdown", breakdown_plot(brk, cores)[0])
        else:
            skipped["fig4_breakdown"] = "no point run both with and without overlap"
    lessons = _lessons(sw, out, formats, made, skipped, log)
    anim = _animation(sw, p0, out, made, skipped, log) if gif else None
    stages = sweep_stats.stage_table(ranks) if len(ranks) else None
    numbers = {"setup": setup(sw), "headline": sweep_stats.headline(bub, mem, brk, stages)
               if len(bub) else {}, "lessons": lessons, "animation": anim,
               "fig1": [{k: p[k] for k in ("title", "path", "step", "span_ms")} for p in panels],
               "fig7": [{k: p[k] for k in ("title", "schedule", "p", "m", "v", "path", "step",
                                           "span_ms")} for p in zb_panels],
               "memory": _memory_records(mem), "made": made, "skipped": skipped}
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1, default=str))
    log(f"wrote {len(made)} figures and numbers.json into {out}")
    return numbers


def _memory_records(mem) -> list:
    """Figure 9's numbers: per (p, schedule, v, m, rank) the measured peak activation bytes
    (median over repeats) and the theory (meta.json's pebbles_theory)."""
    if not len(mem):
        return []
    return [{"p": int(r.p), "schedule": r.schedule, "v": int(r.v), "m": int(r.m),
             "rank": int(r.rank), "measured": float(r.peak_act),
             "theory": None if pd.isna(r.peak_theory) else float(r.peak_theory)}
            for r in mem.itertuples() if pd.notna(r.peak_act)]


def _panel(path, title, **extra) -> dict:
    """One pebble-graph panel: the run's typical steady step (typical_step)."""
    run = load_run(path)
    step = typical_step(run)
    ev = run.events[run.events["step"] == step]
    return {"title": title, "events": run.events, "pebbles": run.pebbles, "meta": run.meta,
            "step": step, "path": str(path),
            "span_ms": float(step_windows(ev)["span"].iloc[0]) * 1e3, **extra}


def _zb_panels(sw, p) -> list:
    """Figure 7: 1F1B, interleaved, ZB-H1 and ZB-V at one p and m (m=4 if every one ran
    there, else the largest m they share), the median-span repeat of each."""
    r = sweep_stats.blocking(sw["runs"]) if len(sw["runs"]) else sw["runs"]
    if p is None or r.empty:
        return []
    r = r[r["p"] == p]
    common = None
    for s in ZB_PANELS:
        ms = set(int(m) for m in r.loc[r["schedule"] == s, "m"])
        common = ms if common is None else common & ms
    if not common:
        return []
    m = 4 if 4 in common else max(common)
    out = []
    for s in ZB_PANELS:
        path = _pick(sw, p, s, m)
        v = int(r.loc[(r["schedule"] == s) & (r["m"] == m), "v"].max())
        out.append(_panel(path, f"{sched_label(s, v)}, m={m}", schedule=s, p=int(p), m=m, v=v))
    return out


def _lessons(sw, out, formats, made, skipped, log):
    """Figure 5 through analysis.lessons (the lessons' numbers and drawing)."""
    r = sw["runs"]
    les = r[r["tag"] == "lessons"]
    runs = {e: sw["path"][(g["point"].iloc[0], int(g["repeat"].iloc[0]))]
            for e, g in les.groupby("exp")}
    if not set(lessons.RUNS) <= set(runs):
        skipped["lesson_requires_grad"] = skipped["lesson_detach"] = \
            "needs lessons-tagged runs of deep_mlp, no_requires_grad and no_detach"
        return None
    numbers = lessons.figures(runs, out, formats=formats)
    for name in ("lesson_requires_grad", "lesson_detach"):
        made[name] = [f"{name}.{f}" for f in formats]
    log("drew lesson_requires_grad, lesson_detach")
    numbers["printed"] = lessons.describe(numbers)
    numbers["runs"] = {k: str(v) for k, v in runs.items()}
    numbers["steps"] = load_steps(runs["deep_mlp"])
    return numbers


def typical_step(run) -> int:
    """The steady step whose span is the run's median one (a single drawn step should be
    typical, not the one an OS hiccup happened to stretch)."""
    st = steady(run.steps)[1] or run.steps
    w = step_windows(run.events[run.events["step"].isin(st) & (run.events["lane"] != "step")])
    return int((w["span"] - w["span"].median()).abs().idxmin())


def load_steps(run_dir) -> int:
    return int(OmegaConf.load(Path(run_dir) / "config.yaml").train.steps)


def _animation(sw, p, out, made, skipped, log):
    """Figure 6: GIF and PNG frames of the representative naive run's last step."""
    path = _pick(sw, p, "naive", 1)
    if path is None:
        skipped["fig6_animation"] = "no naive run"
        return None
    run = load_run(path)
    step = typical_step(run)
    span = float(step_windows(run.events[run.events["step"] == step])["span"].iloc[0])
    eps = min(FRAME_EPS, span / 300)  # a tiny model's ops are shorter than FRAME_EPS
    states = frame_states(run.events, run.pebbles, run.meta, step, eps=eps)
    frames_dir = out / "fig6_frames"
    frames_dir.mkdir(exist_ok=True)
    for old in frames_dir.glob("*.png"):  # a previous, longer animation leaves no stale frames
        old.unlink()
    images = []
    rc = {**style.RC, "figure.dpi": GIF_DPI, "savefig.dpi": GIF_DPI, "savefig.bbox": "standard",
          "figure.constrained_layout.use": False}
    with plt.rc_context(rc):
        fig, _, update = pebble_animation(states, run.events, run.meta, step)
        for k in range(len(states)):
            update(k)
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            (frames_dir / f"{k:03d}.png").write_bytes(buf.getvalue())
            images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        plt.close(fig)
    # one palette for all frames, from a montage of up to 24 of them (so a colour that shows
    # in only a few frames, like a lit MPI edge, is in it): steady colours, a small file
    pick = images[::max(1, len(images) // 24)]
    w, h = pick[0].size
    sheet = Image.new("RGB", (w, h * len(pick)))
    for i, im in enumerate(pick):
        sheet.paste(im, (0, i * h))
    pal = sheet.quantize(colors=128, method=Image.Quantize.FASTOCTREE)
    q = [im.quantize(palette=pal, dither=Image.Dither.NONE) for im in images]
    q[0].save(out / "fig6_animation.gif", save_all=True, append_images=q[1:],
              duration=durations(states), loop=0, optimize=True, disposal=1)
    made["fig6_animation"] = ["fig6_animation.gif", "fig6_frames/"]
    log(f"drew fig6_animation ({len(states)} frames)")
    return {"run": str(path), "step": step, "frames": len(states), "eps_s": eps,
            "span_ms": states[-1]["t"] * 1e3}


def setup(sw) -> dict:
    """What the captions say about how the numbers were made."""
    r = sw["runs"]
    meas = r[r["tag"] != "lessons"] if len(r) else r
    if meas.empty:
        return {}
    key = next(iter(sw["path"]))
    cfg = OmegaConf.load(Path(sw["path"][key]) / "config.yaml")
    meta = sw["meta"][key]
    reps = meas.groupby("point").size()
    return {"model": f"{cfg.model.layers}-layer MLP, width {cfg.model.width}, "
                     f"{cfg.model.in_features} inputs, {cfg.model.classes} classes",
            "batch": int(cfg.data.batch_size), "steps": int(cfg.train.steps),
            "ps": sorted(int(x) for x in meas["p"].unique()),
            "ms": sorted(int(x) for x in meas["m"].unique()),
            "repeats": int(reps.median()), "runs": int(len(r)),
            "device": meta["ranks"][0].get("device"), "threads": meta["ranks"][0].get("threads"),
            "cores": sw["cores"], "torch": meta.get("versions", {}).get("torch"),
            "mpi": (meta.get("mpi_library") or "").split("MPICH Release")[0].strip(),
            "oversubscribed_ps": sorted(int(x) for x in meas.loc[meas["oversubscribed"], "p"]
                                        .unique()),
            "sweep": sw["spec"].get("sweep", {}).get("name"),
            "failed": int((sw["index"]["status"] == "failed").sum()),
            "seconds": float(sw["index"]["seconds"].sum())}


if __name__ == "__main__":
    raise SystemExit(main())
