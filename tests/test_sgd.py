"""harness.core.sgd.SGD against torch.optim.SGD: the same parameters and momentum buffers, bit for
bit, after every step (the same functional SGD, the same kernels); without torch._dynamo."""
import subprocess
import sys

import pytest
import torch

from harness.core.sgd import SGD


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_every_step_equals_torchs_sgd_bit_for_bit(momentum):
    ours, theirs = _model(0), _model(0)
    frozen = [ours[2].bias, theirs[2].bias]      # a parameter whose grad stays None
    for p in frozen:
        p.requires_grad_(False)
    a = SGD(ours.parameters(), lr=0.05, momentum=momentum)
    b = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum)
    torch.manual_seed(1)
    for _ in range(5):
        x = torch.randn(7, 6)
        for m, opt in ((ours, a), (theirs, b)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(p, q)
            assert p.grad is None and q.grad is None
        if momentum:
            for p, q in zip(ours.parameters(), theirs.parameters()):
                if q in b.state:
                    assert torch.equal(a.state[p]["momentum_buffer"],
                                       b.state[q]["momentum_buffer"])
            assert len(a.state) == len(b.state) == 3
        else:
            assert a.state == {}
    assert torch.equal(ours[2].bias, theirs[2].bias)          # untouched, as torch leaves it


def test_zero_grad_without_none_zeroes_in_place():
    m = _model(0)
    opt = SGD(m.parameters(), lr=0.1)
    m(torch.ones(2, 6)).sum().backward()
    g = m[0].weight.grad
    opt.zero_grad(set_to_none=False)
    assert m[0].weight.grad is g and not g.any()
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)


@pytest.mark.mpi      # a process of its own: this one has imported torch._dynamo long ago
def test_a_step_does_not_import_torch_dynamo():
    code = ("import sys, torch\nfrom harness.core.sgd import SGD\n"
            "m = torch.nn.Linear(3, 2)\nopt = SGD(m.parameters(), lr=0.1, momentum=0.9)\n"
            "m(torch.ones(1, 3)).sum().backward(); opt.step(); opt.zero_grad()\n"
            "print('torch._dynamo' in sys.modules)\n"
            "torch.optim.SGD(m.parameters(), lr=0.1)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["False", "True"]       # torch's class imports it (the check's control)
