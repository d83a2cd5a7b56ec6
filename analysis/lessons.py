"""The seed's two lessons, computed and drawn from three run directories (deep_mlp,
no_requires_grad, no_detach): the numbers that make each lesson and its figure.

`experiments.lessons` launches the runs; this module only reads them (docs/lessons.md).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from omegaconf import OmegaConf

from analysis import load_run, metrics, style
from analysis.plots import detach_lesson, requires_grad_lesson
from harness import config
from harness.models import mlp as model
from harness.runformat import weights_file

RUNS = ("deep_mlp", "no_requires_grad", "no_detach")


def figures(runs: dict, out: Path, formats=("png", "pdf")) -> dict:
    """Draw lesson_requires_grad and lesson_detach from run directories {RUNS}; returns the
    numbers of both lessons (see `describe` for their one-line summaries)."""
    good, nrg, nd = (load_run(runs[k]) for k in RUNS)
    mg = metrics.memory_by_step(good.events, good.pebbles, good.memory)
    mb = metrics.memory_by_step(nd.events, nd.pebbles, nd.memory)
    with plt.rc_context(style.RC):
        style.save(requires_grad_lesson(good.stats, nrg.stats)[0], out, "lesson_requires_grad",
                   formats)
        style.save(detach_lesson(mg, mb)[0], out, "lesson_detach", formats)

    p = nrg.world_size
    s = nrg.stats
    early = s[s["rank"] < p - 1]
    last = int(mb["step"].max())

    def last_loss(st):
        return float(st.dropna(subset=["loss"]).sort_values("step")["loss"].iloc[-1])

    def held(m):  # MiB of activations each stage holds after the last step
        return {int(r): float(v) / 2**20
                for r, v in m[m["step"] == last].set_index("rank")["act_bytes"].items()}
    return {
        "world_size": p,
        "requires_grad": {"max_grad_norm_upstream": float(early["grad_norm"].max()),
                          "weights_changed_per_stage": weights_changed(runs["no_requires_grad"], p),
                          "final_loss_correct": last_loss(good.stats),
                          "final_loss_ablation": last_loss(s)},
        "detach": {"step": last, "activations_MiB_correct": held(mg),
                   "activations_MiB_ablation": held(mb)},
    }


def describe(numbers: dict) -> list[str]:
    """One line per lesson, from `figures`' numbers."""
    r, d, world = numbers["requires_grad"], numbers["detach"], numbers["world_size"]
    return [f"lesson 1 (requires_grad): stages 0..{world - 2} max gradient norm "
            f"{r['max_grad_norm_upstream']:g}; weights changed per stage "
            f"{r['weights_changed_per_stage']}; final loss {r['final_loss_ablation']:.4f} vs "
            f"{r['final_loss_correct']:.4f} correct",
            f"lesson 2 (detach): activations held after step {d['step']} (MiB per stage): "
            f"{ {k: round(v, 1) for k, v in d['activations_MiB_ablation'].items()} } vs "
            f"{ {k: round(v, 1) for k, v in d['activations_MiB_correct'].items()} } correct"]


def weights_changed(run_dir: Path, world: int) -> list[bool]:
    """Per stage: do its final weights differ from the initial ones (rebuilt from the seed)?"""
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config.Config),
                                              OmegaConf.load(Path(run_dir) / "config.yaml")))
    out = []
    for r in range(world):
        final = torch.load(Path(run_dir) / weights_file(r), weights_only=True)
        changed = False
        for i, sd in final.items():
            init = model.build_layer(cfg.model, i, cfg.train.seed).state_dict()
            changed |= any(not torch.equal(sd[k], init[k]) for k in init)
        out.append(changed)
    return out
