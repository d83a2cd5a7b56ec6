"""`torchrun --nproc-per-node P -m harness.run runtime=torch [exp=NAME] [key=value ...]`: the
run of harness.run, with PyTorch's pipeline as the executor.

harness.run hands a process that torchrun started to `main` here. The config is validated
first, on every rank alone (as under mpirun, and before any communication or torch's import),
then the default process group (gloo, for PyTorch's pipeline) and our own collectives
(harness.torchpipe.dist) are set up and the usual Run trains with the torch worker and the
torchrun failure policy.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from functools import partial

from .. import config
from .env import rank_size


def main(argv: list[str], on_run=None) -> int:
    """One run (on_run: as harness.run.main's, for harness.batch)."""
    rank, size = rank_size()

    def error(msg: str) -> int:   # every rank reaches the same verdict; rank 0 says it
        if rank == 0:
            print(f"harness.run: error: {msg}", file=sys.stderr, flush=True)
        return 2
    if rank == 0:
        for w in config.unreadable_warnings():
            print(w, file=sys.stderr, flush=True)
    try:
        cfg, sched = config.load_with_schedule(argv, world_size=size)
    except config.ConfigError as e:
        return error(str(e))
    if cfg.runtime != "torch":
        return error(f"torchrun started this job, so it runs torch.distributed.pipelining: add "
                     f"runtime=torch (runtime={cfg.runtime} is our executor, started with "
                     f"mpirun -n {size} python -m harness.run ...)")
    # imported only now, for a configuration that will run: torch and the run (a refused one
    # is said in a fraction of a second, as under mpirun)
    import torch.distributed as dist
    from ..train import Run
    from .dist import DistComm
    from .failure import TorchFailurePolicy
    from .worker import TorchWorker
    # a gloo operation that never completes raises after this; our watchdog (comm.timeout_s)
    # explains a blocked receive first
    # (a batch's runs, harness.batch, share the first run's group: gloo's re-initialisation
    # in one process can hang)
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=2 * cfg.comm.timeout_s + 30))
    comm = DistComm()
    run = Run(cfg, sched, rank, size, comm=comm, worker=partial(TorchWorker, comm=comm),
              policy=TorchFailurePolicy)
    if on_run is not None:
        on_run(run)
    code = run.main(catch_signals=on_run is None)
    if on_run is None:
        dist.destroy_process_group()
    return code
