"""The names of torch.distributed.pipelining the instrument relies on, checked against the torch
that is installed.

The instrument patches nothing: it replaces methods on the *instances* of a run's stages and
schedule, and hooks modules and autograd (harness/torchpipe/probe.py). That still ties it to
names, some of them private, which PyTorch may rename in any release. `missing()` lists those
the installed torch lacks; `check()` raises one error naming them, and `Probe` calls it before
it wraps anything, so an upgrade fails loudly at set-up instead of recording nonsense.
tests/test_torchpipe_names.py runs it against the pinned torch. docs/torchpipe.md says what
each name is used for.
"""
from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

import torch
from torch.distributed import P2POp
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV,
                                           ScheduleGPipe, ScheduleInterleaved1F1B,
                                           ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)
from torch.distributed.pipelining import schedules as _schedules

SINGLE = (ScheduleGPipe, Schedule1F1B)      # PipelineScheduleSingle: one stage per rank
RUNTIME = (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble,
           ScheduleDualPipeV)               # _PipelineScheduleRuntime: runs a lowered plan

# stage methods the probe replaces on each stage instance, with the parameters it reads
STAGE_METHODS = {
    "forward_one_chunk": ("fwd_chunk_id",),
    "backward_one_chunk": ("bwd_chunk_id", "loss", "full_backward", "last_backward"),
    "backward_weight_one_chunk": ("bwd_chunk_id",),
    "get_fwd_recv_ops": ("fwd_chunk_id",),
    "get_bwd_recv_ops": ("bwd_chunk_id",),
    "get_fwd_send_ops": ("fwd_chunk_id",),
    "get_bwd_send_ops": ("bwd_chunk_id",),
    "perform_reduce_grad": ("grad_scale_factor",),
}
# attributes read from a stage (set in __init__, so looked up in the source of its classes)
STAGE_ATTRS = ("stage_index", "num_stages", "submod", "group_rank", "group_size",
               "stage_index_to_group_rank")
STAGE_PROPERTIES = ("is_first", "is_last")
# schedule members: everyone's, the single-stage classes', the runtime classes'
SCHEDULE_METHODS = {"_compute_loss": ("output", "target")}
SCHEDULE_ATTRS = ("_n_microbatches", "pipeline_order")
SINGLE_ATTRS = ("_stage",)
RUNTIME_ATTRS = ("_stages", "pipeline_order_with_comms")
RUNTIME_METHODS = {"_assert_unsharded": ("stage",)}
# the plan's action type and the computation types the plan conversion maps
ACTION_FIELDS = ("stage_index", "computation_type", "microbatch_index", "sub_actions")
COMPUTATION_TYPES = ("F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "OVERLAP_F_B",
                     "UNSHARD", "RESHARD", "REDUCE_GRAD")
P2P_ATTRS = ("tensor", "peer", "tag")


@functools.lru_cache(maxsize=None)
def _module_text(module: str) -> str:
    try:
        return Path(sys.modules[module].__file__).read_text()
    except (KeyError, OSError, TypeError):
        return ""


def _source(cls) -> str:
    """The source of the modules of a class and its bases (where `self.x = ...` assignments
    live; inspect.getsource of a class parses its whole module each time: seconds here)."""
    return "\n".join(_module_text(c.__module__) for c in cls.__mro__
                     if c.__module__.startswith("torch."))


def _methods(cls, methods: dict) -> list[str]:
    out = []
    for name, params in methods.items():
        fn = getattr(cls, name, None)
        if not callable(fn):
            out.append(f"{cls.__name__}.{name}")
            continue
        have = inspect.signature(fn).parameters
        out += [f"{cls.__name__}.{name}({p}=)" for p in params if p not in have]
    return out


def _attrs(cls, attrs) -> list[str]:
    src = _source(cls)
    return [f"{cls.__name__}.{a}" for a in attrs
            if f"self.{a} =" not in src and f"self.{a}:" not in src]


def missing(stage_cls=PipelineStage, single=SINGLE, runtime=RUNTIME, module=_schedules,
            p2p=P2POp) -> list[str]:
    """Every name of the list above that the installed torch lacks ([] when all are there).
    The arguments stand in for torch's own objects (tests pass stand-ins that lack one)."""
    out = _methods(stage_cls, STAGE_METHODS) + _attrs(stage_cls, STAGE_ATTRS)
    out += [f"{stage_cls.__name__}.{a}" for a in STAGE_PROPERTIES
            if not isinstance(getattr(stage_cls, a, None), property)]
    for cls in (*single, *runtime):
        out += _methods(cls, SCHEDULE_METHODS) + _attrs(cls, SCHEDULE_ATTRS)
    for cls in single:
        out += _attrs(cls, SINGLE_ATTRS)
    for cls in runtime:
        out += _methods(cls, RUNTIME_METHODS) + _attrs(cls, RUNTIME_ATTRS)
    action = getattr(module, "_Action", None)
    ctype = getattr(module, "_ComputationType", None)
    if action is None:
        out.append("schedules._Action")
    else:
        out += [f"_Action.{f}" for f in ACTION_FIELDS if f not in getattr(action, "_fields", ())]
    if ctype is None:
        out.append("schedules._ComputationType")
    else:
        values = {c.value for c in ctype}
        out += [f"_ComputationType '{v}'" for v in COMPUTATION_TYPES if v not in values]
    params = inspect.signature(p2p.__init__).parameters
    out += [f"{p2p.__name__}.{a}" for a in P2P_ATTRS if a not in params]
    return out


class TorchNamesMissing(RuntimeError):
    """The installed torch lacks names the instrument relies on."""


def check(**kw) -> None:
    """Raise TorchNamesMissing naming every missing name (see `missing`)."""
    gone = missing(**kw)
    if gone:
        raise TorchNamesMissing(
            f"torch {torch.__version__}: torch.distributed.pipelining lacks "
            f"{', '.join(gone)}, which harness.torchpipe relies on (harness/torchpipe/names.py, "
            f"docs/torchpipe.md); this torch is not the one the instrument was written for")
