"""Entry point: `[mpirun -n P] python -m harness.run [exp=NAME] [key=value ...]`, or, to run
PyTorch's own pipeline (torch.distributed.pipelining) on the same stages and record it the same
way, `torchrun --nproc-per-node P -m harness.run runtime=torch ...` (harness.torchpipe).

One process per pipeline stage. The config is validated, and the schedule built from it, before
any MPI communication; the ranks then agree on the verdict (the job's first communication), and
each runs `harness.train.Run`: the run directory, the training loop, the end, or the failure path.
"""
from __future__ import annotations

import gc
import os
import sys

from . import config
from .ops import signals
from .torchpipe.env import under_torchrun


def main(argv: list[str] | None = None, on_run=None) -> int:
    """One run; `on_run(run)` (harness.batch) is told the Run before it starts, and then the
    batch's one signal catcher serves it instead of a catcher of its own."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        for w in config.unreadable_warnings():
            print(w, file=sys.stderr, flush=True)
        print(config.help_text())
        return 0
    signals.block()  # before MPI and torch start threads: they inherit the blocked mask
    if under_torchrun():  # runtime=torch: PyTorch's pipeline under torchrun, no MPI world
        # imported only now: torch.distributed, which --help and our runs never need
        from .torchpipe.launch import main as torch_main
        return torch_main(argv, on_run)
    # imported only now: MPI (and its threads), which --help never needs; torch only once
    # the ranks agreed that the configuration is good (harness.core.world has no torch)
    from .core import world

    rank, size = world.rank_size()
    alone = unjoined(size)
    if alone:  # every task is rank 0 of its own world: the first task says it
        if os.environ.get("SLURM_PROCID", "0") == "0":
            print(f"harness.run: error: {alone}", file=sys.stderr, flush=True)
        return 2
    if rank == 0:
        for w in config.unreadable_warnings():
            print(w, file=sys.stderr, flush=True)
    cfg, sched, error = None, None, None
    try:
        cfg, sched = config.load_with_schedule(argv, world_size=size)
    except config.ConfigError as e:
        error = str(e)
    # Every rank validates on its own and should reach the same verdict; agreeing on it (the
    # job's first communication) makes sure no rank trains while another has quit.
    if error is None and cfg.runtime == "torch":
        error = (f"runtime=torch runs torch.distributed.pipelining, which torchrun starts: "
                 f"torchrun --nproc-per-node {size} -m harness.run runtime=torch ...")
    errors = world.allgather(error)
    if any(errors):
        first = next(r for r, e in enumerate(errors) if e)
        if rank == first:  # printed once
            print(f"harness.run: error: {errors[first]}", file=sys.stderr, flush=True)
        return 2
    from .train import Run  # torch, its threads and the model: only for a run that will go
    run = Run(cfg, sched, rank, size)
    if on_run is None:
        return run.main()
    on_run(run)
    return run.main(catch_signals=False)


def unjoined(size: int) -> str | None:
    """srun started several tasks but MPI made each a world of its own (no PMI joined them):
    each would train alone. None when that is not the case."""
    n = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if size != 1 or not n.isdigit() or int(n) < 2:
        return None
    return (f"srun started {n} tasks but MPI sees a world of 1 in each (Slurm's PMI did not "
            f"join them): use srun --mpi=pmi2 (PyPI's MPICH speaks it), or mpirun inside "
            f"salloc/sbatch")


def freeze_for_exit(rc: int) -> int:
    """rc, after moving every object left out of the garbage collector's reach: the
    interpreter's exit ends in full collections, which walk torch's ~10^6 objects (~0.6 s of
    each rank's exit here, so of every job's wall time). Objects are still freed by their
    reference counts; cycles are left to the operating system, with the process. Nothing of
    the run depends on a collection at exit: its files are closed before main returns, and MPI
    finalizes in mpi4py's atexit handler as before."""
    gc.freeze()
    return rc


if __name__ == "__main__":
    sys.exit(freeze_for_exit(main()))
