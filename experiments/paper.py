"""The paper's figures in one command: run the default sweep, draw every figure, caption them.

    python -m experiments.paper [--out DIR] [--quick] [--gallery DIR] [--no-gif]

1. runs experiments/paper.yaml (or paper_quick.yaml with --quick: a tiny 1-repeat sweep for
   tests) with experiments.sweep into DIR (default results/paper-<timestamp>); an existing DIR
   of the same sweep is resumed: complete runs are kept, failed ones retried;
2. draws the figure set into DIR/figures with analysis.figures (PNG + PDF, the GIF);
3. writes DIR/figures/figures.md: every figure with a caption stating the setup (model, p, m,
   device, repeats) and the measured numbers;
4. with --gallery DIR: copies small PNGs (1000 px wide) and the GIF there (docs/gallery).
Exit status 1 if any run failed (the figures are still drawn from the others).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from PIL import Image

from analysis import figures
from experiments import sweep
from harness.schedule import BUBBLE_FORMULA

HERE = Path(__file__).resolve().parent
GALLERY_PX = 1000  # width of the README's gallery images
NAME = {"naive": "naive", "gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "interleaved",
        "zb_h1": "ZB-H1", "zbv": "ZB-V", "dualpipev": "DualPipeV"}
CLASSIC = ("naive", "gpipe", "1f1b")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.paper",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="sweep directory (default results/paper-<timestamp>); "
                    "resumed if it holds the same sweep")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sweep (experiments/paper_quick.yaml)")
    ap.add_argument("--gallery", help="also write small PNGs and the GIF into this folder")
    ap.add_argument("--no-gif", action="store_true", help="skip the animation")
    a = ap.parse_args(argv)
    spec = sweep.load_spec(HERE / ("paper_quick.yaml" if a.quick else "paper.yaml"))
    name = spec["sweep"]["name"]
    out = Path(a.out or f"results/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    index = sweep.run_sweep(spec, out)
    t_sweep = time.perf_counter() - t0
    print(f"sweep: {sweep.summary(index)} in {t_sweep:.0f} s", file=sys.stderr)
    numbers = figures.make(out, out / "figures", gif=not a.no_gif)
    numbers["sweep_wall_s"] = t_sweep
    (out / "figures" / "figures.md").write_text(index_markdown(numbers))
    if a.gallery:
        gallery(out / "figures", Path(a.gallery))
    print(f"figures and figures.md in {out / 'figures'} ({time.perf_counter() - t0:.0f} s in all)",
          file=sys.stderr)
    print(out)
    return 1 if (index["status"] == "failed").any() else 0


def gallery(src: Path, dest: Path, px: int = GALLERY_PX) -> list[Path]:
    """Downsized copies of the PNGs (README-sized) and the GIF."""
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for p in sorted(src.glob("*.png")):
        im = Image.open(p)
        if im.width > px:
            im = im.resize((px, round(im.height * px / im.width)), Image.Resampling.LANCZOS)
        # 256-colour octree palette: a quarter of the bytes, and (unlike median cut, which
        # merged the rarer microbatch colours) every palette colour of the figure survives
        im = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
        im.save(dest / p.name, optimize=True)
        done.append(dest / p.name)
    for g in src.glob("*.gif"):
        shutil.copyfile(g, dest / g.name)
        done.append(dest / g.name)
    return done


# -- figures.md -------------------------------------------------------------------------------
def _ls(xs):
    return ", ".join(map(str, xs))


def _pct(x):
    return "–" if x is None else f"{100 * x:.0f} %"


def _setup_line(s: dict) -> str:
    if not s:
        return "_No complete schedule runs in this sweep._"
    over = (f" p={','.join(map(str, s['oversubscribed_ps']))} on {s['cores']} cores is "
            f"**oversubscribed** (ranks share cores; hollow markers)." if s["oversubscribed_ps"]
            else "")
    return (f"Setup: {s['model']}, batch {s['batch']}, {s['steps']} steps per run (step 0 is "
            f"warm-up; each run's numbers are medians over the rest); p ∈ {{{_ls(s['ps'])}}}, "
            f"m ∈ {{{_ls(s['ms'])}}}; device {s['device']}, {s['threads']} torch thread per rank, "
            f"{s['cores']} cores; torch {s['torch']}, {s['mpi']}. {s['repeats']} "
            f"repeat{'s' if s['repeats'] != 1 else ''} per point: figures show the median "
            f"over repeats and the interquartile range. "
            f"{s['runs']} runs ({s['failed']} failed).{over}")


def _bubble_caption(b: list, s: dict) -> str:
    b = sorted(b, key=lambda r: (r["p"], list(NAME).index(r["schedule"])
                                 if r["schedule"] in NAME else 9, r["m"]))
    rows = ["| p | schedule | m | bubble measured (IQR) | theory | step (ms) | compute per "
            "stage (ms) |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {r['p']} | {NAME.get(r['schedule'])} | {r['m']} | {_pct(r['measured'])} "
             f"({_pct(r['q1'])}–{_pct(r['q3'])}) | {_pct(r['theory'])} | {r['span_ms']:.1f} | "
             f"{' / '.join(f'{c:.1f}' for c in r.get('compute_stage_ms', []))} |" for r in b]
    p0 = min(r["p"] for r in b)
    naive = next((r for r in b if r["p"] == p0 and r["schedule"] == "naive"), None)
    deep = max((r for r in b if r["p"] == p0 and r["schedule"] != "naive"),
               key=lambda r: (r["m"], r["schedule"] == "gpipe"), default=None)
    found = ""
    if naive and deep:
        c0, c1 = (sum(r["compute_stage_ms"]) for r in (naive, deep))
        trend = ("grows" if c1 > 1.02 * c0 else "shrinks" if c1 < 0.98 * c0
                 else "stays within 2 %")
        found = (f" Measured for p={p0}: naive {_pct(naive['measured'])} (theory "
                 f"{_pct(naive['theory'])}); {NAME.get(deep['schedule'])} at m={deep['m']} "
                 f"{_pct(deep['measured'])} (theory {_pct(deep['theory'])}). The stages' "
                 f"compute per step {trend} with m: {c1:.1f} ms at m={deep['m']} against "
                 f"{c0:.1f} ms at m=1 ({(c1 / c0 - 1) * 100:+.0f} %). Where the rest of the "
                 f"idle time goes (blocked sends, receive waits, transfers): figure 4.")
    over = (f" Hollow markers: p={','.join(map(str, s['oversubscribed_ps']))} ran on "
            f"{s['cores']} cores (oversubscribed; MPI ranks busy-poll while they wait), so "
            f"those times are not a pipeline's." if s.get("oversubscribed_ps") else "")
    return ("Bubble fraction (per step: mean over ranks of idle/span, idle = span − compute; "
            "docs/analysis.md) against m for each p: markers are measured medians over "
            "repeats with interquartile ranges (marker = schedule), curves the theory "
            f"{BUBBLE_FORMULA['gpipe']} for equal stage times and no communication cost."
            + found + over
            + "\n\n" + "\n".join(rows))


def _sched(r) -> str:
    return NAME.get(r["schedule"], r["schedule"]) + (f" (v={r['v']})" if r.get("v", 1) > 1
                                                     else "")


def _zb_bubble_caption(b: list, s: dict) -> str:
    order = list(NAME)
    b = sorted(b, key=lambda r: (r["p"], order.index(r["schedule"]) if r["schedule"] in order
                                 else 9, r["m"]))
    rows = ["| p | schedule | m | bubble measured (IQR) | theory, equal F/B/W | theory, measured "
            "F/B/W | simulated | step (ms) |", "|---|---|---|---|---|---|---|---|"]
    rows += [f"| {r['p']} | {_sched(r)} | {r['m']} | {_pct(r['measured'])} ({_pct(r['q1'])}–"
             f"{_pct(r['q3'])}) | {_pct(r['theory'])} | {_pct(r.get('theory_times'))} | "
             f"{_pct(r.get('simulated'))} | {r['span_ms']:.1f} |" for r in b]
    sim = [abs(r["simulated"] - r["measured"]) for r in b if r.get("simulated") is not None]
    gap = (f" The simulator's prediction differs from the measured bubble by at most "
           f"{100 * max(sim):.0f} percentage points (median "
           f"{100 * sorted(sim)[len(sim) // 2]:.1f}): what its model leaves out (contention "
           f"between ranks on shared cores, the machine's load; docs/analysis.md)."
           if sim else "")
    over = (f" Hollow markers: p={','.join(map(str, s['oversubscribed_ps']))} ran on "
            f"{s['cores']} cores (oversubscribed)." if s.get("oversubscribed_ps") else "")
    return ("Bubble fraction against m for every schedule, one panel per p: markers are "
            "measured medians over repeats with interquartile ranges, lines each schedule's "
            "closed-form theory with its v chunks per rank and equal forward, input-gradient "
            "and weight-gradient times (harness.schedule.bubble: interleaved (p−1)/(v·m+p−1), "
            "ZB-H1 (p−1)(f+b−min(w,f)) / ((p−1)(f+b−min(w,f)) + m(f+b+w)), ZB-V as PyTorch's "
            "order k·f / (k·f + 6mf) with k = max(p−1, 2(2p−1−m)); docs/schedules.md), crosses the simulator's "
            "prediction for each run (harness.simulate replaying the run's own schedule with "
            "its own per-chunk action, gap and message times; analysis.whatif). The table adds "
            "the zero-bubble theory evaluated with the run's mean F, B and W times, as the "
            "zero-bubble paper computes its bubble rates." + gap + over
            + "\n\n" + "\n".join(rows))


def _zb_memory_caption(mem: list) -> str:
    order = list(NAME)
    mem = sorted(mem, key=lambda r: (r["p"], order.index(r["schedule"]) if r["schedule"] in
                                     order else 9, r["m"], r["rank"]))
    exact = sum(r["measured"] == r["theory"] for r in mem)
    kib = lambda x: "–" if x is None else f"{x / 1024:.1f}"  # noqa: E731
    rows = ["| p | schedule | m | rank | peak measured (KiB) | theory (KiB) |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {r['p']} | {_sched(r)} | {r['m']} | {r['rank']} | {kib(r['measured'])} | "
             f"{kib(r['theory'])} |" for r in mem]
    return ("Peak activation bytes held per stage (live pebbles, max over a step, median over "
            "steady steps and repeats) against m for every schedule, measured (open markers, "
            "one shape per stage) on the theory (wide dashes: the schedule walked with each "
            "chunk-microbatch weighing its chunk's bytes per microbatch, "
            f"harness.schedule.pebble_theory). {exact} of {len(mem)} (point, stage) peaks equal "
            "the theory to the byte.\n\n" + "\n".join(rows))


def index_markdown(n: dict) -> str:
    """figures.md: each figure, its caption, and the numbers it shows."""
    s, h, made = n.get("setup") or {}, n.get("headline") or {}, n.get("made", {})
    L = [f"# Figures{' — sweep ' + s['sweep'] if s.get('sweep') else ''}", "",
         _setup_line(s), ""]
    if s.get("seconds"):
        L += [f"The runs took {s['seconds']:.0f} s of mpirun wall time in all, one after the "
              f"other (~{s['seconds'] / max(s['runs'], 1):.1f} s per run, most of it start-up); "
              f"this invocation ran what was missing in {n.get('sweep_wall_s', 0):.0f} s.", ""]

    def fig(name, title, text):
        if name in made:
            first = made[name][0]
            L.extend([f"## {title}", "", f"![{title}]({first})", "", text, ""])
    if n.get("fig1"):
        spans = ", ".join(f"{p['title']} {p.get('span_ms', float('nan')):.0f} ms"
                          for p in n["fig1"])
        fig("fig1_schedules", "Figure 1: three schedules, one time scale",
            f"Measured pebble graphs of one step (the steady step of median span) of naive, "
            f"GPipe and 1F1B on "
            f"p={s.get('ps', ['?'])[0]} ranks, the same model and batch, drawn on one time "
            f"axis. Rows: each stage's layers, forward (F) above backward (B); solid boxes: "
            f"compute, coloured by microbatch; pale bars: pebbles (activations held for "
            f"backward) from store to free; grey: idle; arrows: send → receive. Step spans: "
            f"{spans}. Runs: the median-span repeat of each point.")
    b = [r for r in h.get("bubble") or [] if r["schedule"] in CLASSIC]
    if b:
        fig("fig2_bubble", "Figure 2: bubble against microbatches", _bubble_caption(b, s))
    mr = h.get("memory_ratio") or []
    if mr:
        rows = ["| p | m | 1F1B / GPipe measured | theory min(p,m)/m |", "|---|---|---|---|"]
        rows += [f"| {r['p']} | {r['m']} | {r['measured']:.2f} | {r['theory']:.2f} |" for r in mr]
        fig("fig3_memory", "Figure 3: peak activation memory",
            "Peak activation bytes held per stage (live pebbles: stored and not yet freed, "
            "max over a step) against m, GPipe and 1F1B (naive at m=1), measured (open "
            "markers, one shape per stage) on the theory (wide dashes: bytes per microbatch × "
            "microbatches in flight, walked from the schedule). The "
            "batch is fixed, so GPipe holds the whole batch's activations at any m while "
            "1F1B's stage s holds min(m, p−s) microbatches of 1/m of the batch. Stage 0, "
            "1F1B against GPipe:\n\n" + "\n".join(rows))
    ov = h.get("overlap") or []
    if ov:
        noise = max(abs(r["compute_ms_overlap"] - r["compute_ms_blocking"]) for r in ov)
        rows = ["| p | schedule | m | step, blocking (ms) | step, overlapped (ms) | change |",
                "|---|---|---|---|---|---|"]
        rows += [f"| {r['p']} | {NAME.get(r['schedule'])} | {r['m']} | "
                 f"{r['span_ms_blocking']:.1f} | {r['span_ms_overlap']:.1f} | "
                 f"{100 * (r['span_ms_overlap'] / r['span_ms_blocking'] - 1):+.0f} % |"
                 for r in ov]
        fig("fig4_breakdown", "Figure 4: where a step's time goes",
            "Per schedule, with blocking Send/Recv and with overlapped (Isend/Irecv posted "
            "early, Wait before use) communication, one stacked bar per rank: compute, time "
            "blocked in a receive before the sender started (Scalasca's late sender), the "
            "transfer itself, blocked sends, and the remaining idle time; the bars add up to "
            "the median step span, with its interquartile range on top (medians over repeats). "
            f"The compute is the same work either way, yet its median per rank differs between "
            f"the blocking and the overlapped runs by up to {noise:.1f} ms: step differences of "
            f"that size are run-to-run variation, not an effect of overlap.\n\n"
            + "\n".join(rows))
    les = n.get("lessons")
    if les:
        rg, de = les["requires_grad"], les["detach"]
        changed = ", ".join(f"stage {i} {'changed' if c else 'unchanged'}"
                            for i, c in enumerate(rg["weights_changed_per_stage"]))
        fig("lesson_requires_grad", "Figure 5a: the receiver must set requires_grad",
            f"Loss and per-stage weight-update norm over {les.get('steps', '?')} steps of "
            f"the naive pipeline, with and without requires_grad on the received activation "
            f"(same model, seed and data; one run each: the effect is exact). Without it, "
            f"the largest gradient norm on any stage before the last is "
            f"{rg['max_grad_norm_upstream']:g}, and the final weights against the initial "
            f"ones: {changed}; the loss still falls, through the last stage alone: "
            f"{rg['final_loss_ablation']:.3f} after the last step against "
            f"{rg['final_loss_correct']:.3f} for the correct pipeline.")
        held = lambda d: ", ".join(f"stage {k}: {v:.1f} MiB" for k, v in d.items())  # noqa: E731
        fig("lesson_detach", "Figure 5b: the sender must detach",
            f"Activations held and process memory at the end of every step, with and without "
            f"detach on the sender. After step {de['step']}: "
            f"{held(de['activations_MiB_ablation'])} without detach; "
            f"{held(de['activations_MiB_correct'])} with it.")
    if n.get("fig7"):
        spans = ", ".join(f"{q['title']} {q.get('span_ms', float('nan')):.0f} ms"
                          for q in n["fig7"])
        q0 = n["fig7"][0]
        fig("fig7_zb_schedules", "Figure 7: 1F1B, interleaved, ZB-H1 and ZB-V, one time scale",
            f"Measured pebble graphs of one step (the steady step of median span) of 1F1B, "
            f"interleaved 1F1B (v chunks per rank, Megatron-LM's round-robin placement), ZB-H1 "
            f"and ZB-V (two chunks per rank in a V: rank 0 holds the first and the loss stage) "
            f"on p={q0['p']} ranks, m={q0['m']}, the same model and batch, drawn on one time "
            f"axis as in figure 1. With several chunks a rank's rows are the layers of all its "
            f"chunks; under split backward the input gradient (B) is a solid box and the weight "
            f"gradient (W) a hatched one in the backward rows, and a microbatch's pebbles stay "
            f"until its W ends. Step spans: {spans}.")
    zb = h.get("bubble") or []
    if zb and "fig8_zb_bubble" in made:
        fig("fig8_zb_bubble", "Figure 8: bubble against microbatches, every schedule",
            _zb_bubble_caption(zb, s))
    if "fig9_zb_memory" in made and n.get("memory"):
        fig("fig9_zb_memory", "Figure 9: peak activation memory, every schedule",
            _zb_memory_caption(n["memory"]))
    an = n.get("animation")
    if an:
        fig("fig6_animation", "Figure 6: the pebble graph, animated from a measured step",
            f"Step {an['step']} of the naive run ({an['span_ms']:.1f} ms), in the style of "
            f"Simon Boehm's article: per rank, forward ops over backward ops with a pebble "
            f"between each pair (filled while that layer's activations are held), MPI edges "
            f"between ranks (lit while a message is in flight), the running op lit, a clock "
            f"of measured time. {an['frames']} frames: one per group of event times (starts, "
            f"ends, stores, frees) closer than {an['eps_s'] * 1e6:.0f} µs, plus an empty "
            f"first and last frame; each frame's duration follows the measured time it "
            f"covers. Frames as PNG in fig6_frames/.")
    for k, why in (n.get("skipped") or {}).items():
        L.append(f"- not drawn: {k} ({why})")
    return "\n".join(L).rstrip() + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
