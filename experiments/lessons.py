"""The seed's two lessons as one command: run the correct pipeline and both ablations, then draw.

    python -m experiments.lessons [--ranks 2] [--out DIR] [key=value ...]

Runs `deep_mlp`, `no_requires_grad` and `no_detach` (same model, seed and steps; one mpirun
each), then writes into DIR (default results/lessons-<timestamp>):
- lesson_requires_grad.{png,pdf}: loss, and each stage's weight-update norm, per step;
- lesson_detach.{png,pdf}: activations held and process memory at the end of every step;
and prints the numbers that make each lesson. See docs/lessons.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.lessons",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", help="output folder (must not exist)")
    ap.add_argument("overrides", nargs="*", help="key=value for all three runs")
    a = ap.parse_args(argv)
    out = Path(a.out or f"results/lessons-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=False)  # never into an existing folder

    from harness.launch import launch
    runs = {}
    for exp in ("deep_mlp", "no_requires_grad", "no_detach"):
        print(f"running {exp} on {a.ranks} ranks ...", flush=True)
        runs[exp] = launch(a.ranks, [f"exp={exp}", "run.save_weights=true", *a.overrides],
                           out / exp)
    figures(runs, out)
    return 0


def figures(runs: dict, out: Path, formats=("png", "pdf")) -> dict:
    """Draw both lessons from run directories {deep_mlp, no_requires_grad, no_detach}; returns
    the numbers it printed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis import load_run, metrics, style
    from analysis.plots import detach_lesson, requires_grad_lesson

    good, nrg, nd = (load_run(runs[k]) for k in ("deep_mlp", "no_requires_grad", "no_detach"))
    with plt.rc_context(style.RC):
        for name, (fig, _) in {
            "lesson_requires_grad": requires_grad_lesson(good.stats, nrg.stats),
            "lesson_detach": detach_lesson(
                metrics.memory_by_step(good.events, good.pebbles, good.memory),
                metrics.memory_by_step(nd.events, nd.pebbles, nd.memory)),
        }.items():
            for fmt in formats:
                fig.savefig(out / f"{name}.{fmt}")
            plt.close(fig)

    p = nrg.world_size
    s = nrg.stats
    early = s[s["rank"] < p - 1]
    changed = weights_changed(runs["no_requires_grad"], p)
    last_loss = lambda st: float(st.dropna(subset=["loss"]).sort_values("step")["loss"].iloc[-1])  # noqa: E731
    mg = metrics.memory_by_step(good.events, good.pebbles, good.memory)
    mb = metrics.memory_by_step(nd.events, nd.pebbles, nd.memory)
    last = int(mb["step"].max())
    held = lambda m: {int(r): float(v) / 2**20 for r, v in  # noqa: E731
                      m[m["step"] == last].set_index("rank")["act_bytes"].items()}
    numbers = {
        "requires_grad": {"max_grad_norm_upstream": float(early["grad_norm"].max()),
                          "weights_changed_per_stage": changed,
                          "final_loss_correct": last_loss(good.stats),
                          "final_loss_ablation": last_loss(s)},
        "detach": {"step": last, "activations_MiB_correct": held(mg),
                   "activations_MiB_ablation": held(mb)},
    }
    r = numbers["requires_grad"]
    print(f"lesson 1 (requires_grad): stages 0..{p - 2} max gradient norm "
          f"{r['max_grad_norm_upstream']:g}; weights changed per stage {changed}; final loss "
          f"{r['final_loss_ablation']:.4f} vs {r['final_loss_correct']:.4f} correct")
    d = numbers["detach"]
    print(f"lesson 2 (detach): activations held after step {last} (MiB per stage): "
          f"{ {k: round(v, 1) for k, v in d['activations_MiB_ablation'].items()} } vs "
          f"{ {k: round(v, 1) for k, v in d['activations_MiB_correct'].items()} } correct")
    print(f"figures in {out}")
    return numbers


def weights_changed(run_dir: Path, world: int) -> list[bool]:
    """Per stage: do its final weights differ from the initial ones (rebuilt from the seed)?"""
    from harness import config, model
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config.Config),
                                              OmegaConf.load(run_dir / "config.yaml")))
    out = []
    for r in range(world):
        final = torch.load(run_dir / "ranks" / f"weights.r{r}.pt", weights_only=True)
        changed = False
        for i, sd in final.items():
            init = model.build_layer(cfg.model, i, cfg.train.seed).state_dict()
            changed |= any(not torch.equal(sd[k], init[k]) for k in init)
        out.append(changed)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
