"""The stage's optimizer: torch.optim.SGD's update, computed by torch's own functional SGD.

torch.optim.SGD(params, lr=lr, momentum=momentum) and this class run the same function
(`torch.optim.sgd.sgd`), with the same arguments and so the same kernels: one tensor at a time
on the CPU, `torch._foreach_*` on CUDA, as torch picks them. The parameters and momentum buffers
are bit-identical after every step (tests/test_sgd.py).

The class is not torch's because torch.optim.Optimizer's methods import `torch._dynamo` the
first time they run (`step` through `_use_grad_for_differentiable`, `add_param_group` and
`zero_grad` through `torch._disable_dynamo`), to keep torch.compile out of them. That import
costs 1.0-1.2 s of CPU here, as much as importing torch itself, in every rank of every run; the
harness never compiles an optimizer. (PyTorch's own pipeline, runtime=torch, imports
`torch._dynamo` anyway and keeps torch.optim.SGD: harness.torchpipe.)

Nor are torch.optim's step hooks and its profiler range (`Optimizer.step#SGD.step`) here: in a
torch.profiler trace the step is the harness's own OPT range (harness.trace.ranges).
"""
from __future__ import annotations

import torch
from torch.optim.sgd import sgd


class SGD:
    """SGD with momentum (no dampening, no weight decay, not Nesterov), as the harness's
    `train.lr` and `train.momentum` configure it. `state[p]["momentum_buffer"]` as in torch."""

    def __init__(self, params, lr: float, momentum: float = 0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.lr, self.momentum = float(lr), float(momentum)
        self.state: dict = {}

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        # as torch.optim.SGD._init_group: a buffer per parameter only with momentum
        bufs = ([self.state.get(p, {}).get("momentum_buffer") for p in params]
                if self.momentum != 0 else [])
        sgd(params, [p.grad for p in params], bufs, has_sparse_grad=any(
            p.grad.is_sparse for p in params), foreach=None, fused=None,
            weight_decay=0.0, momentum=self.momentum, lr=self.lr, dampening=0.0,
            nesterov=False, maximize=False)
        if self.momentum != 0:
            for p, b in zip(params, bufs):
                self.state.setdefault(p, {})["momentum_buffer"] = b

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()
