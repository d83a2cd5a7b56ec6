"""Typed, documented configuration; `exp=NAME key=value ...` on the command line.

Resolution order (later wins): the defaults below < `experiments/NAME.yaml` < command-line
`key=value` overrides (Hydra's override syntax for plain values and lists; OmegaConf does the
parsing, merging and type checking). Everything is validated here, before any MPI communication,
so every rank reaches the same verdict on its own and the job fails fast and identically.
Hydra itself is not used: its `@hydra.main` would make every rank create an output directory.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf._utils import get_omega_conf_dumper  # quotes what OmegaConf reads otherwise
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from . import schedule as S
from .ops import debug_knobs, malloc

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
DEFAULT_EXPERIMENT = "deep_mlp"
QUOTED = ("trace.kineto",)  # string keys whose values YAML would misread unquoted (1:2 -> 62)


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what is allowed."""


def doc(text: str, default=MISSING, factory=MISSING):
    """A dataclass field with its one-line meaning (shown by `--help`)."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class RunCfg:
    dir: Optional[str] = doc("run directory; default results/<exp>-<timestamp>. "
                             "An existing non-empty directory is refused", None)
    save_weights: bool = doc("write each rank's final weights to ranks/weights.r<R>.pt "
                             "(keyed by global layer index)", False)
    local_dir: Optional[str] = doc("per-rank scratch directory (no shared file system needed): "
                                   "ranks write under <local_dir>/<run name>/ and send their "
                                   "files to rank 0's run.dir over MPI at the end, checked; "
                                   "{rank} and {host} are replaced. Default: the run directory",
                                   None)


@dataclass
class TrainCfg:
    steps: int = doc("training steps (one step = one full batch through the pipeline)", 30)
    lr: float = doc("SGD learning rate", 0.003)
    momentum: float = doc("SGD momentum (0 = plain SGD)", 0.9)
    seed: int = doc("seed for weights and data; same seed = same model for any world size", 0)
    stop_on_nonfinite: bool = doc("stop the run (status failed, error Diverged) at the first "
                                  "non-finite loss or gradient norm; false = keep training "
                                  "(to study divergence) and record where it began", True)


@dataclass
class DataCfg:
    batch_size: int = doc("samples per step (split into pipeline.microbatches)", 256)
    noise: float = doc("std of the Gaussian noise around each class centre", 1.0)


@dataclass
class ModelCfg:
    name: str = doc("built-in model: mlp (the deep MLP below) or gpt (the gpt.* section)", "mlp")
    factory: Optional[str] = doc("your own model: 'package.module:function' returning a "
                                 "harness.models.BlockModel (docs/models.md); wins over name", None)
    layers: int = doc("Linear layers in the MLP (ReLU after each but the last)", 16)
    width: int = doc("hidden width", 1024)
    in_features: int = doc("input features of the synthetic data", 256)
    classes: int = doc("classes of the synthetic data (cross-entropy loss)", 10)


@dataclass
class GptCfg:
    vocab: int = doc("GPT: vocabulary (token ids 0..vocab-1)", 256)
    seq: int = doc("GPT: sequence length", 128)
    d: int = doc("GPT: model width", 256)
    heads: int = doc("GPT: attention heads (must divide gpt.d)", 4)
    layers: int = doc("GPT: transformer blocks (the model has layers + 2 blocks: embedding "
                      "and head are blocks too)", 8)
    mlp_ratio: int = doc("GPT: MLP hidden width / d", 4)
    attention: str = doc("GPT: explicit (q·kᵀ, mask, softmax, ·v written out) or sdpa "
                         "(scaled_dot_product_attention)", "explicit")


@dataclass
class PipelineCfg:
    split: Optional[List[int]] = doc("layers per stage, e.g. [9,7]; default: balanced by "
                                     "parameter count", None)
    microbatches: int = doc("microbatches per step (must divide data.batch_size)", 1)
    overlap: bool = doc("post receives early and send without blocking (Isend/Irecv + Wait), "
                        "so transfers can overlap compute", False)
    recv_requires_grad: bool = doc("the receiver marks the received activation requires_grad; "
                                   "false = the seed's first lesson (earlier stages stop learning)", True)
    detach: bool = doc("the sender detaches what it sends and lets its graph go after backward; "
                       "false = the seed's second lesson (graphs of past steps kept: memory grows)", True)
    balance: str = doc("default split: params (equal parameters per stage) or time (each "
                       "block's forward+backward measured once at set-up)", "params")
    recompute: str = doc("GPT: none, full (checkpoint each block) or attention (only the "
                         "attention core, selective recomputation)", "none")
    virtual: int = doc("model chunks per rank (virtual stages): the blocks are split into "
                       "ranks x virtual chunks; interleaved needs >= 2, zbv and dualpipev 2, the rest 1", 1)


@dataclass
class TraceCfg:
    enabled: bool = doc("write per-rank traces (spans, pebbles, memory); false trains identically", True)
    per_layer: bool = doc("one span and pebble attribution per layer (else per stage)", True)
    sample_interval_ms: float = doc("memory sampling interval of the background thread", 10.0)
    clock_exchanges: int = doc("ping-pong exchanges per rank for clock-offset estimation", 10)
    block_times: bool = doc("time each block's forward and backward alone at set-up, at the "
                            "microbatch sizes of m = 1, 2, 4, 8, 16 and the run's own "
                            "(meta.json ranks[r].block_times): what analysis.whatif predicts "
                            "other microbatch counts, splits and split backward from", True)
    block_repeats: int = doc("timings of each block at each size for block_times, after one "
                             "warm-up call; the shortest counts (fewer: a shorter set-up, "
                             "noisier ratios between sizes)", 5)
    kineto: str = doc("START:END: record a torch.profiler (Kineto) trace on every rank for steps "
                      "START..END (inclusive) into trace/kineto.r<R>.json; the analysis merges "
                      "it into trace.json. Empty = off", "")


@dataclass
class CommCfg:
    timeout_s: float = doc("a blocking send/receive/wait that takes longer aborts the job", 120.0)
    wait: str = doc("spin|sleep|backoff: how a blocked rank waits. spin = MPI's blocking calls "
                    "(busy-poll, exact times); sleep = test every comm.poll_us (frees the core, "
                    "times late by <= ~poll_us); backoff = test for comm.spin_us, then sleep "
                    "10 us doubling to comm.poll_us", "spin")
    poll_us: float = doc("with comm.wait=sleep: sleep between completion tests; with backoff: "
                         "the longest sleep, microseconds", 50.0)
    spin_us: float = doc("with comm.wait=backoff: how long a wait busy-tests before it sleeps, "
                         "microseconds", 200.0)
    cuda_aware: str = doc("auto|true|false: pass CUDA buffers to MPI directly (else stage "
                          "through host memory); auto asks MPI (mpi_memory_alloc_kinds)", "auto")


@dataclass
class DebugCfg:
    fail_rank: int = doc("test knob: raise an exception on this rank (-1 = never)", -1)
    fail_step: int = doc("test knob: ... at the start of this step", 0)
    stall_rank: int = doc("test knob: this rank stops communicating (sleeps) ... (-1 = never)", -1)
    stall_step: int = doc("test knob: ... at the start of this step, so its peers' receives "
                          "can never complete", 0)
    clock_rank: int = doc("test knob: rank whose trace clock is skewed (-1 = none)", -1)
    clock_offset_ms: float = doc("test knob: constant offset added to that rank's clock", 0.0)
    clock_drift_ppm: float = doc("test knob: drift of that rank's clock, parts per million", 0.0)
    slow_rank: int = doc("test knob: rank made a straggler (-1 = none)", -1)
    slow_ms: float = doc("test knob: ... each of its blocks sleeps this long in forward and "
                         "again in backward (harness/ops/debug_knobs.py)", 0.0)
    mismatch_rank: int = doc("test knob: this rank runs a wrong schedule (its first send moved "
                             "after the next receive), so the job hangs (-1 = never)", -1)
    mismatch_step: int = doc("test knob: ... in this step", 0)
    no_shared_fs: bool = doc("test knob: ranks other than 0 are not told the run directory, as "
                             "on hosts that cannot see it (needs run.local_dir with {rank})", False)


@dataclass
class Config:
    exp: str = doc("experiment: experiments/<exp>.yaml", DEFAULT_EXPERIMENT)
    base: Optional[str] = doc("experiment this one starts from (its yaml is merged first)", None)
    description: str = doc("one line saying what the experiment shows", "")
    world_sizes: Optional[List[int]] = doc("world sizes (ranks) the experiment can use; "
                                           "default any from 1 to model.layers", None)
    device: str = doc("auto|cpu|cuda; auto = cuda:<local rank> when CUDA is available", "auto")
    threads: int = doc("torch threads per rank; 0 = cores / ranks on this host (at least 1)", 0)
    malloc: str = doc("keep: glibc keeps freed blocks under 32 MiB for the next tensor; "
                      "system: glibc's default, which returns them to the kernel, and each reuse "
                      "pays a page fault per 4 KiB (harness/ops/malloc.py)", "keep")
    quiet: bool = doc("no per-step progress line", False)
    schedule: str = doc("pipeline schedule: naive (m=1), gpipe, 1f1b, interleaved, zb_h1, zbv, dualpipev",
                        "naive")
    precision: str = doc("fp32, or bf16: each forward under torch.autocast (matmuls in bf16; "
                         "bf16 boundary tensors travel as same-size int16 views)", "fp32")
    runtime: str = doc("ours (our executor, under mpirun) or torch: torch.distributed."
                       "pipelining's class for the schedule runs the same stages, started by "
                       "torchrun, and is recorded the same way (docs/torchpipe.md)", "ours")
    run: RunCfg = doc("", factory=RunCfg)
    train: TrainCfg = doc("", factory=TrainCfg)
    data: DataCfg = doc("", factory=DataCfg)
    model: ModelCfg = doc("", factory=ModelCfg)
    gpt: GptCfg = doc("", factory=GptCfg)
    pipeline: PipelineCfg = doc("", factory=PipelineCfg)
    trace: TraceCfg = doc("", factory=TraceCfg)
    comm: CommCfg = doc("", factory=CommCfg)
    debug: DebugCfg = doc("", factory=DebugCfg)


def read_yaml(path: Path):
    """OmegaConf.load, with a YAML syntax error as a one-line ConfigError naming file:line:col."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None


_SCANNED: dict = {}   # the files' (path, mtime, size, inode) -> what _scan found in them


def _scan() -> tuple[dict, dict]:
    """-> ({name: description} of the runnable experiments, {name: error} of unreadable files).

    One broken file must not break every command: it is reported, and only asking for it fails.
    Reading every file is most of a config's load time (OmegaConf builds each one), so the
    answer is kept until a file is added, removed or changed."""
    paths = sorted(EXPERIMENTS_DIR.glob("*.yaml"))
    key = tuple((str(p), st.st_mtime_ns, st.st_size, st.st_ino)
                for p in paths for st in [p.stat()])
    if key not in _SCANNED:
        _SCANNED.clear()
        _SCANNED[key] = _read_experiments(paths)
    ok, broken = _SCANNED[key]
    return dict(ok), dict(broken)


def _read_experiments(paths) -> tuple[dict, dict]:
    ok, broken = {}, {}
    for p in paths:
        try:
            y = read_yaml(p)
        except ConfigError as e:
            broken[p.stem] = str(e)
            continue
        if "sweep" in y:  # sweep definitions live beside experiments but are not runnable here
            continue
        ok[p.stem] = str(y.get("description", ""))
    return ok, broken


def experiments() -> dict[str, str]:
    """Available experiments: name -> description (from their yaml)."""
    return _scan()[0]


def unreadable_warnings() -> list[str]:
    """One warning line per file under experiments/ that cannot be read (and was skipped)."""
    return [f"warning: skipped an unreadable experiment file: {msg}"
            for msg in _scan()[1].values()]


def keys(cls=Config, prefix="") -> list[tuple[str, str, object]]:
    """(dotted key, meaning, default) for every leaf field, for --help and error messages."""
    out = []
    for f in fields(cls):
        default = f.default_factory() if f.default is MISSING else f.default
        if is_dataclass(default):
            out += keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f.metadata.get("help", ""), default))
    return out


def _section_keys(full_key: str) -> list[str]:
    section = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    return [k for k, _, _ in keys() if k.startswith(section) and "." not in k[len(section):]]


def load(argv: list[str], world_size: int = 1) -> Config:
    """Compose the config from `exp=NAME` and `key=value` arguments and validate it."""
    return load_with_schedule(argv, world_size)[0]


def load_with_schedule(argv: list[str], world_size: int = 1) -> tuple[Config, S.Schedule]:
    """`load`, and the schedule validating it built (harness.schedule.build): the run's one
    Schedule object, built once."""
    overrides, exp = [], DEFAULT_EXPERIMENT
    for arg in argv:
        if "=" not in arg or arg.startswith(("+", "~", "-")):
            raise ConfigError(f"cannot read argument {arg!r}: expected key=value "
                              f"(e.g. train.steps=5); see --help")
        k, v = arg.split("=", 1)
        if k == "exp":
            exp = v
        elif k in QUOTED and v[:1] not in ("'", '"'):
            # YAML 1.1 would read 2:3 as the base-60 integer 123
            overrides.append(f"{k}='{v}'")
        else:
            overrides.append(arg)
    known, broken = _scan()
    if exp in broken:
        raise ConfigError(broken[exp])
    if exp not in known:
        raise ConfigError(f"exp={exp!r}: no experiments/{exp}.yaml; "
                          f"allowed: {', '.join(known) or '(none found)'}")
    try:
        schema = _schema()      # merge copies its first argument: the cached one stays clean
        cli = OmegaConf.from_dotlist(overrides)
        merged = OmegaConf.merge(schema, *_experiment_chain(exp, known), cli, {"exp": exp})
        cfg: Config = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(f"unknown key {key!r}; keys here: {', '.join(_section_keys(key))}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "?")
        want = next((type(d).__name__ for k, _, d in keys() if k == key and d is not None), "")
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" + (f" (expected {want})" if want else "")) from None
    return cfg, validate(cfg, world_size)


@functools.cache
def _schema():
    return OmegaConf.structured(Config)


def _experiment_chain(exp: str, known) -> list:
    """The yaml of `exp` preceded by those of its `base`, `base`'s base, ... (oldest first)."""
    chain, name = [], exp
    while name is not None:
        if name in (n for n, _ in chain):
            raise ConfigError(f"exp={exp!r}: its base chain loops at {name!r}")
        if name not in known:
            _, broken = _scan()
            if name in broken:
                raise ConfigError(f"base={name!r} (in experiments/{chain[-1][0]}.yaml): "
                                  f"{broken[name]}")
            raise ConfigError(f"base={name!r} (in experiments/{chain[-1][0]}.yaml): no such "
                              f"experiment; allowed: {', '.join(known)}")
        y = read_yaml(EXPERIMENTS_DIR / f"{name}.yaml")
        chain.append((name, y))
        name = y.get("base")
    return [y for _, y in reversed(chain)]


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: int) -> S.Schedule:
    """Semantic checks that types alone cannot express. Raises ConfigError. -> the schedule of
    the config for `world_size` ranks (building it is one of the checks)."""
    t, d, m, p = cfg.train, cfg.data, cfg.model, cfg.pipeline
    for key, _, default in keys():  # inf and nan parse as floats; no float key allows them
        v = _get(cfg, key)
        _check(not (isinstance(default, float) and isinstance(v, float) and not math.isfinite(v)),
               f"{key}={v}: must be a finite number")
    _check(t.steps >= 1, f"train.steps={t.steps}: must be >= 1")
    _check(t.lr > 0, f"train.lr={t.lr}: must be > 0")
    _check(0 <= t.momentum < 1, f"train.momentum={t.momentum}: must be in [0, 1)")
    _check(d.batch_size >= 1, f"data.batch_size={d.batch_size}: must be >= 1")
    _check(d.noise >= 0, f"data.noise={d.noise}: must be >= 0")
    for k in ("layers", "width", "in_features", "classes"):
        v = getattr(m, k)
        _check(v >= 1, f"model.{k}={v}: must be >= 1")
    _check(m.name in ("mlp", "gpt"), f"model.name={m.name!r}: allowed mlp, gpt "
           f"(your own model: model.factory=package.module:function)")
    if m.factory is not None:
        # local: imports the user's module (and torch)
        from .models.base import UserCodeError, resolve_factory
        try:
            resolve_factory(m.factory)
        except (ValueError, UserCodeError) as e:  # the user's module raised: its traceback
            raise ConfigError(str(e)) from None
    g = cfg.gpt
    for k in ("vocab", "seq", "d", "heads", "layers", "mlp_ratio"):
        _check(getattr(g, k) >= 1, f"gpt.{k}={getattr(g, k)}: must be >= 1")
    _check(g.d % g.heads == 0, f"gpt.d={g.d}: must be a multiple of gpt.heads={g.heads}")
    _check(g.attention in ("explicit", "sdpa"), f"gpt.attention={g.attention!r}: allowed explicit, sdpa")
    _check(p.balance in ("params", "time"), f"pipeline.balance={p.balance!r}: allowed params, time")
    _check(p.recompute in ("none", "full", "attention"),
           f"pipeline.recompute={p.recompute!r}: allowed none, full, attention")
    _check(p.recompute == "none" or (m.name == "gpt" and m.factory is None),
           f"pipeline.recompute={p.recompute}: only the built-in GPT (model.name=gpt) recomputes")
    blocks = m.layers if m.name == "mlp" else g.layers + 2
    _check(cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r}: allowed auto, cpu, cuda")
    _check(cfg.precision in ("fp32", "bf16"), f"precision={cfg.precision!r}: allowed fp32, bf16")
    if cfg.device == "cuda":
        import torch  # heavy: only to check device=cuda (--help and the rest never need it)
        _check(torch.cuda.is_available(), "device=cuda: CUDA is not available here (no GPU, or a "
               "CPU build of torch); use device=auto or device=cpu")
    _check(cfg.threads >= 0, f"threads={cfg.threads}: must be >= 0 (0 = automatic)")
    _check(cfg.malloc in malloc.POLICIES,
           f"malloc={cfg.malloc!r}: allowed {', '.join(malloc.POLICIES)}")
    _check(cfg.comm.cuda_aware in ("auto", "true", "false"),
           f"comm.cuda_aware={cfg.comm.cuda_aware!r}: allowed auto, true, false")
    _check(cfg.comm.wait in ("spin", "sleep", "backoff"),
           f"comm.wait={cfg.comm.wait!r}: allowed spin, sleep, backoff")
    _check(cfg.comm.poll_us > 0, f"comm.poll_us={cfg.comm.poll_us}: must be > 0")
    _check(cfg.comm.spin_us >= 0, f"comm.spin_us={cfg.comm.spin_us}: must be >= 0")
    _check(cfg.comm.timeout_s > 0, f"comm.timeout_s={cfg.comm.timeout_s}: must be > 0")
    _check(cfg.trace.sample_interval_ms > 0,
           f"trace.sample_interval_ms={cfg.trace.sample_interval_ms}: must be > 0")
    _check(cfg.trace.clock_exchanges >= 1,
           f"trace.clock_exchanges={cfg.trace.clock_exchanges}: must be >= 1")
    _check(cfg.trace.block_repeats >= 1,
           f"trace.block_repeats={cfg.trace.block_repeats}: must be >= 1")
    if cfg.world_sizes is not None:
        _check(world_size in cfg.world_sizes,
               f"world size {world_size}: experiment {cfg.exp!r} runs with "
               f"{' or '.join(map(str, cfg.world_sizes))} ranks (world_sizes)")
    if m.factory is None:  # a factory's block count is known once it is built (stage.prepare)
        what = "model.layers" if m.name == "mlp" else "gpt.layers+2 blocks"
        _check(world_size <= blocks,
               f"world size {world_size}: more pipeline stages than {what}={blocks}; "
               f"use at most {blocks} ranks or more layers")
        _check(world_size * p.virtual <= blocks,
               f"pipeline.virtual={p.virtual}: {world_size} ranks x {p.virtual} chunks = "
               f"{world_size * p.virtual} stages, more than {what}={blocks}")
    _check(p.virtual >= 1, f"pipeline.virtual={p.virtual}: must be >= 1")
    if p.split is not None:
        _check(len(p.split) == world_size * p.virtual,
               f"pipeline.split={list(p.split)}: needs one entry per rank ({world_size})"
               if p.virtual == 1 else f"pipeline.split={list(p.split)}: needs one entry per "
               f"stage (ranks x pipeline.virtual = {world_size * p.virtual})")
        _check(all(n >= 1 for n in p.split), f"pipeline.split={list(p.split)}: every stage needs >= 1 layer")
    if p.split is not None and m.factory is None:  # a factory's: harness.core.stage.prepare
        _check(sum(p.split) == blocks,
               f"pipeline.split={list(p.split)}: sums to {sum(p.split)}, the model has {blocks} "
               f"blocks")
    _check(p.microbatches >= 1, f"pipeline.microbatches={p.microbatches}: must be >= 1")
    _check(d.batch_size % p.microbatches == 0,
           f"pipeline.microbatches={p.microbatches}: must divide data.batch_size={d.batch_size}")
    _check(cfg.schedule in S.SCHEDULES,
           f"schedule={cfg.schedule!r}: allowed {', '.join(S.SCHEDULES)}")
    try:
        sched = S.build(cfg.schedule, world_size, p.microbatches, p.overlap, p.virtual)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_runtime(cfg)
    # run.dir is checked by rank 0 when it creates the directory (rundir.choose): checking it
    # here would race with rank 0 creating it.
    _check(math.isfinite(cfg.debug.slow_ms) and cfg.debug.slow_ms >= 0,
           f"debug.slow_ms={cfg.debug.slow_ms}: must be a finite number >= 0")
    _check(not cfg.debug.no_shared_fs or "{rank}" in (cfg.run.local_dir or ""),
           "debug.no_shared_fs=true: needs run.local_dir with {rank} (each rank its own "
           "directory)")
    if cfg.run.local_dir:
        try:
            cfg.run.local_dir.format(rank=0, host="h")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"run.local_dir={cfg.run.local_dir!r}: only {{rank}} and {{host}} "
                              f"may be replaced ({e!r})") from None
    if cfg.trace.kineto:
        parse_steps(cfg.trace.kineto)
    if 0 <= cfg.debug.mismatch_rank < world_size:
        try:
            debug_knobs.mismatch(sched[cfg.debug.mismatch_rank])
        except ValueError as e:
            raise ConfigError(f"debug.mismatch_rank={cfg.debug.mismatch_rank}: {e}") from None
    for k in ("fail_rank", "stall_rank", "clock_rank", "slow_rank", "mismatch_rank"):
        v = getattr(cfg.debug, k)
        _check(-1 <= v < world_size, f"debug.{k}={v}: no such rank in a world of {world_size} "
               f"(-1 = off)")
    return sched


def _check_runtime(cfg: Config) -> None:
    """runtime=torch runs what PyTorch's classes run: the keys that change our executor's
    behaviour have no counterpart there (docs/torchpipe.md, "What runtime=torch does not do")."""
    _check(cfg.runtime in ("ours", "torch"), f"runtime={cfg.runtime!r}: allowed ours, torch")
    if cfg.runtime != "torch":
        return
    p = cfg.pipeline
    for bad, msg in (
            (p.overlap, "pipeline.overlap=true: PyTorch's sends and receives are always "
                        "non-blocking"),
            (not (p.recv_requires_grad and p.detach), "pipeline.recv_requires_grad and "
             "pipeline.detach: the ablations change our executor, not PyTorch's"),
            (cfg.precision != "fp32", f"precision={cfg.precision}: fp32 only"),
            (p.recompute != "none", f"pipeline.recompute={p.recompute}: none only"),
            (cfg.device == "cuda", "device=cuda: CPU only (gloo) in this version"),
            (cfg.run.local_dir, "run.local_dir: the files' transfer to rank 0 needs MPI"),
            (cfg.debug.mismatch_rank != -1, "debug.mismatch_rank: our executor's knob")):
        _check(not bad, f"runtime=torch: {msg}")


def parse_steps(text: str) -> tuple[int, int]:
    """`trace.kineto=START:END` -> (START, END), inclusive; ConfigError naming the key."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"trace.kineto={text!r}: expected START:END (steps, e.g. 2:3)") from None
    _check(0 <= a <= b, f"trace.kineto={text!r}: need 0 <= START <= END")
    return a, b


def to_yaml(cfg: Config) -> str:
    """config.yaml's text: what OmegaConf.to_yaml(OmegaConf.structured(cfg)) writes, with its
    YAML dumper (tests/test_config.py compares the two), from the dataclass directly: 0.5 ms,
    not the ~10-30 ms of building a structured config that every run paid once more."""
    return yaml.dump(dataclasses.asdict(cfg), Dumper=get_omega_conf_dumper(),
                     default_flow_style=False, allow_unicode=True, sort_keys=False)


def help_text() -> str:
    lines = ["usage: [mpirun -n P] python -m harness.run [exp=NAME] [key=value ...]", "",
             "Trains a model split into P pipeline stages, one per MPI rank, and writes a run",
             "directory (docs/run-format.md). Overrides use dotted keys, lists as [a,b].", "",
             "experiments (exp=):"]
    for name, desc in experiments().items():
        lines.append(f"  {name:<18} {desc}")
    lines += ["", "keys (default):"]
    for k, h, d in keys():
        if k in ("exp", "description", "base"):
            continue
        lines.append(f"  {k + '=' + str(d):<34} {h}")
    return "\n".join(lines)


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
