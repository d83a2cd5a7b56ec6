"""Profiler ranges around each action, named as torch.distributed.pipelining names them.

Each action the executor runs is a `torch.profiler.record_function` range (seen by Kineto, i.e.
torch.profiler and its trace) and, on CUDA, an NVTX range too (seen by Nsight Systems), so those
timelines line up with ours by name. PyTorch's schedules label actions `PP:{stage}{type}{mb}`
(`_get_profiler_function_name`): F forward, B backward, W weight gradient, I input gradient,
SEND_F/RECV_F the activation, SEND_B/RECV_B the gradient. Ours add WAIT_* for the completion of
a non-blocking send/receive and OPT for the optimizer step. `record_function` costs a few µs per
range when no profiler runs (measured: benchmarks/overhead.py still meets its goal).

The one interface: `labeler(stage, device)` -> a function `action -> context manager`.
"""
from __future__ import annotations

import contextlib
import functools

# our action kinds -> PyTorch's computation type (unknown kinds: upper-cased as they are)
TYPE = {"fwd": "F", "bwd": "B", "bwd_in": "I", "bwd_w": "W", "opt": "OPT",
        "send_act": "SEND_F", "recv_act": "RECV_F", "send_grad": "SEND_B", "recv_grad": "RECV_B",
        "isend_act": "SEND_F", "irecv_act": "RECV_F", "isend_grad": "SEND_B",
        "irecv_grad": "RECV_B", "wait_send_act": "WAIT_SEND_F", "wait_recv_act": "WAIT_RECV_F",
        "wait_send_grad": "WAIT_SEND_B", "wait_recv_grad": "WAIT_RECV_B"}


@functools.lru_cache(maxsize=4096)
def name(stage: int, kind: str, mb: int) -> str:
    """`PP:0F3`, `PP:1RECV_B0`, `PP:0OPT`."""
    return f"PP:{stage}{TYPE.get(kind, kind.upper())}{mb if mb >= 0 else ''}"


class _Nvtx:
    """record_function and an NVTX range, entered and left together."""
    __slots__ = ("label", "nvtx", "rf")

    def __init__(self, rf, nvtx, label):
        self.rf, self.nvtx, self.label = rf, nvtx, label

    def __enter__(self):
        self.nvtx.range_push(self.label)
        self.rf.__enter__()

    def __exit__(self, *exc):
        self.rf.__exit__(*exc)
        self.nvtx.range_pop()


def labeler(stage: int, device=None, enabled: bool = True):
    """-> f(action) giving the context manager of that action's range (a no-op when disabled).
    stage: the rank's stage, or a function action -> stage (virtual stages: the action's chunk
    decides).

    A `record_function` costs microseconds even with no profiler running, so it is entered only
    while one runs (`torch._C._autograd._profiler_enabled()`, a flag read); NVTX push/pop cost
    well under a microsecond without Nsight attached, so on CUDA they are always on."""
    null = contextlib.nullcontext()
    if not enabled:
        return lambda a: null
    # torch when ranges are on: trace modules stay importable without it (the analysis)
    import torch
    from torch.profiler import record_function
    profiling = torch._C._autograd._profiler_enabled
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        from torch.cuda import nvtx  # CUDA only

        def rng(a):
            label = name(_stage(a, stage), a.kind, a.mb)
            return _Nvtx(record_function(label) if profiling() else null, nvtx, label)
        return rng
    return lambda a: (record_function(name(_stage(a, stage), a.kind, a.mb)) if profiling()
                      else null)


def _stage(a, stage) -> int:
    return stage(a) if callable(stage) else stage
