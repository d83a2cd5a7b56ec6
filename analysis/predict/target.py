"""A what-if's configuration from `key=value` overrides, as the harness would build it.

`parse(items, meta)` reads the overrides against the measured run's meta.json (the defaults);
`layout(...)` turns them into what analysis.predict.replay needs: the split (pipeline.split, or the
harness's own rule for pipeline.balance: the MLP and the default balance parameters, `time`
the blocks' forward + backward at the target's rows, from the set-up block times), and each
stage's activation bytes per microbatch from the harness's own formulas for the built-in
models (harness/models/mlp.py, gpt_memory.py: what meta.json's pebbles_theory holds), read
with the run's config.yaml, so a split, world size or recomputation the run did not have is
predicted to the byte. This module imports the harness's model code (torch): only the
command line (analysis.whatif) and the benchmark need it.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from harness import config as hconfig
from harness import schedule as S
from harness.core.stage import gpt_stage_bytes
from harness.models import mlp

KEYS = {"schedule": "schedule", "pipeline.microbatches": "m", "m": "m",
        "pipeline.overlap": "overlap", "data.batch_size": "batch", "ranks": "p",
        "pipeline.split": "split", "pipeline.balance": "balance", "pipeline.virtual": "virtual",
        "pipeline.recompute": "recompute"}


def parse(items, meta: dict) -> dict:
    """key=value list -> {schedule, m, overlap, batch, p, split, balance, virtual, recompute},
    defaults from the run's meta.json; ValueError naming the key and what is allowed."""
    sch, model = meta.get("schedule") or {}, meta.get("model") or {}
    out = {"schedule": sch.get("name") or "naive", "m": int(sch.get("microbatches") or 1),
           "overlap": bool(sch.get("overlap")), "batch": int(model.get("batch_size") or 0),
           "p": int(meta.get("world_size") or 1), "split": None,
           "balance": model.get("balance") or "params", "virtual": int(sch.get("virtual") or 1),
           "recompute": sch.get("recompute") or "none", "given": set()}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or k not in KEYS:
            raise ValueError(f"{it!r}: unknown key; allowed {', '.join(KEYS)} (key=value)")
        f = KEYS[k]
        out["given"].add(f)
        if f == "schedule":
            if v not in S.SCHEDULES:
                raise ValueError(f"schedule={v!r}: allowed {', '.join(S.SCHEDULES)}")
            out[f] = v
        elif f == "overlap":
            if v.lower() not in ("true", "false"):
                raise ValueError(f"{k}={v!r}: allowed true, false")
            out[f] = v.lower() == "true"
        elif f == "split":
            try:
                sizes = json.loads(v)
                assert isinstance(sizes, list) and sizes and all(
                    isinstance(x, int) and x > 0 for x in sizes)
            except (ValueError, AssertionError):
                raise ValueError(f"{k}={v!r}: expected blocks per stage, e.g. [5,3]") from None
            out[f] = sizes
        elif f == "balance":
            if v not in ("params", "time"):
                raise ValueError(f"{k}={v!r}: allowed params, time")
            out[f] = v
        elif f == "recompute":
            if v not in ("none", "full", "attention"):
                raise ValueError(f"{k}={v!r}: allowed none, full, attention")
            if v != "none" and model.get("name") != "gpt":
                raise ValueError(f"{k}={v}: only the built-in GPT (model.name=gpt) recomputes")
            out[f] = v
        else:
            if not v.isdigit() or int(v) < 1:
                raise ValueError(f"{k}={v!r}: must be an integer >= 1")
            out[f] = int(v)
    if out["batch"] % out["m"]:
        raise ValueError(f"pipeline.microbatches={out['m']}: must divide "
                         f"data.batch_size={out['batch']}")
    if "virtual" not in out["given"]:     # the run's chunks per rank if the schedule takes
        for v in (out["virtual"], 1, 2):  # them, else what it takes
            try:
                S.build(out["schedule"], 2, out["m"], out["overlap"], virtual=v)
            except ValueError:
                continue
            out["virtual"] = v
            break
    return out


def run_config(run_path, meta: dict):
    """The run's resolved config (config.yaml over the defaults), or None when it is not one
    of the built-in models the harness's formulas know (a synthetic run, a user's factory)."""
    name = (meta.get("model") or {}).get("name")
    f = Path(run_path) / "config.yaml"
    if name not in ("mlp", "gpt") or not f.exists():
        return None
    merged = OmegaConf.merge(OmegaConf.structured(hconfig.Config), hconfig.read_yaml(f))
    return OmegaConf.to_object(merged)


def bounds(ov: dict, meta: dict, stages: int, curves: dict, assumed: set) -> list | None:
    """(first, end) per global stage for `stages` stages: pipeline.split if given; the run's
    own if nothing about the split changed; else the harness's partition (harness.models.mlp:
    parameters; balance=time on a block model: each block's forward + backward at the
    target's rows from the set-up times `curves` (RunFacts.curves)). None: the run's."""
    if ov["split"]:
        if len(ov["split"]) != stages:
            raise ValueError(f"pipeline.split={ov['split']}: {len(ov['split'])} stages, the "
                             f"schedule has {stages} (ranks x chunks)")
        return [tuple(b) for b in mlp.split_from_sizes(ov["split"])]
    own = [tuple(b) for b in meta.get("split") or []]
    changed = {"p", "virtual", "balance"} & ov["given"]
    if len(own) == stages and not changed:
        return own
    model = meta.get("model") or {}
    params = list(model.get("param_counts") or [])
    if not params:
        raise ValueError("another split needs meta.json's model.param_counts; give "
                         "pipeline.split")
    if ov["balance"] == "time" and model.get("name") != "mlp":
        rows = ov["batch"] // ov["m"]
        costs = []
        for b in range(len(params)):
            fwd, bwd = curves.get((b, "fwd")), curves.get((b, "bwd"))
            if fwd is None or bwd is None:
                raise ValueError("pipeline.balance=time needs the set-up block times "
                                 "(meta.json ranks[r].block_times)")
            costs.append(float(np.interp(rows, *fwd) + np.interp(rows, *bwd)))
        return [tuple(b) for b in mlp.partition(costs, stages)]
    if ov["balance"] == "time":
        assumed.add("pipeline.balance=time: the MLP's split balances parameters (as the "
                    "harness builds it, whatever pipeline.balance says)")
    return [tuple(b) for b in mlp.partition(params, stages)]


def stage_bytes(cfg, split: list, rows: int, recompute: str) -> list | None:
    """Activation bytes one microbatch of `rows` rows leaves on each global stage, from the
    harness's formulas (None without a config: no formula)."""
    if cfg is None:
        return None
    last = len(split) - 1
    if cfg.model.name == "gpt":
        c = copy.deepcopy(cfg)
        c.pipeline.recompute = recompute
        return [gpt_stage_bytes(c, b, rows, s == last) for s, b in enumerate(split)]
    return [mlp.activation_bytes(cfg.model, b, rows, s == last, bf16=cfg.precision == "bf16")
            for s, b in enumerate(split)]


def recompute_share(cfg, before: str, after: str, assumed: set) -> dict | None:
    """{block: share of its forward that its backward reruns} when the target recomputes
    (pipeline.recompute) what the measured run did not (None: nothing more to rerun). full:
    each transformer block's whole forward (harness/models/gpt.py checkpoints the block);
    attention: only the attention core's, estimated as its share of the block's forward
    FLOPs (q·kᵀ and ·v: 4·s·d per token, against 2·d²·(4 + 2·mlp_ratio) for the matmuls):
    an assumption, said so."""
    if after == before or after == "none":
        if after != before:
            raise ValueError(f"pipeline.recompute={after}: predicting from a run that "
                             f"recomputes ({before}) is not supported")
        return None
    if before != "none":
        raise ValueError(f"pipeline.recompute={after} from a run with recompute={before}: "
                         f"predict from a run without recomputation")
    g = cfg.gpt
    blocks = range(1, g.layers + 1)       # embed is block 0, the head block layers + 1
    if after == "full":
        return {b: 1.0 for b in blocks}
    core = 4 * g.seq * g.d
    share = core / (2 * g.d * g.d * (4 + 2 * g.mlp_ratio) + core)
    assumed.add(f"recompute=attention: the attention core is {share * 100:.1f} % of a block's "
                f"forward (its share of the FLOPs; not measured)")
    return {b: share for b in blocks}
