"""harness/ops/malloc.py: `malloc=keep` must really keep freed blocks in the process.

The independent check is the kernel's count of minor page faults (getrusage): a block that
glibc handed back to the kernel faults again, page by page, when the next tensor touches it."""
import json
import platform
import statistics
import subprocess
import sys

import pytest

from harness.ops import malloc

# Plain PyTorch, in a fresh interpreter (mallopt is per process): an 8 x 1024 MLP trained on one
# thread. Each step frees its 4 MiB weight gradients (zero_grad) and activations, and makes
# them again; glibc's own policy hands (part of) them back to the kernel, so every step faults
# them in again: 3,800-9,400 pages per step on Debian's glibc 2.36, varying from run to run
# with glibc's sliding mmap threshold (CI saw a median of 4,064); `keep` keeps them (0-1).
PROBE = r"""
import json, resource, sys, torch
from harness.ops import malloc
state = malloc.apply(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(*[m for _ in range(8) for m in (torch.nn.Linear(1024, 1024),
                                                            torch.nn.ReLU())])
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
x = torch.randn(256, 1024)
faults = []
for _ in range(12):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"state": state, "faults": faults}))
"""


def steady_faults(*policies: str) -> list[tuple[str, float]]:
    """-> per policy (the policy in force, median page faults per step after 5 warm-up steps).
    The probes run side by side: a process's page faults are its own, whatever runs beside it."""
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, p], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in policies]
    got = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            r = json.loads(out.strip().splitlines()[-1])
            got.append((r["state"], statistics.median(r["faults"][5:])))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return got


@pytest.mark.mpi  # launches a process (steady_faults)
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy needs glibc")
def test_keep_stops_the_refaulting_that_glibc_default_pays():
    (s_state, system), (k_state, keep) = steady_faults("system", "keep")
    assert (s_state, k_state) == ("system", "keep")
    grads = 8 * 1024 * 1024 * 4 // 4096               # pages of the weight gradients: 8,192
    assert system > grads // 8, system                  # glibc's own policy faults many again
    assert keep < grads // 50, keep                     # kept: (almost) nothing to fault
    assert keep * 20 < system, (keep, system)


def test_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="malloc=tcmalloc: must be one of keep, system"):
        malloc.apply("tcmalloc")
