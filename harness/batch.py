"""Several runs in one job: `[mpirun -n P] python -m harness.batch FILE` (or, for PyTorch's
pipeline, `torchrun --nproc-per-node P -m harness.batch FILE` with runtime=torch runs).

FILE is a JSON list of argument lists, each what `python -m harness.run` would take
(`[["schedule=gpipe", "run.dir=r/a"], ["schedule=1f1b", "run.dir=r/b"]]`). The runs go one
after another in the same P processes, each exactly as `harness.run` runs it (its own config,
run directory, seed, trace files): only the start-up — imports, MPI's initialisation — is paid
once. One difference: what the garbage collector leaves out of its reach (`_freeze_imports`).
For small models that start-up is most of a run's time; the tests use it to check many
configurations in a few jobs. Every run prints its run directory as its last line, in order.

The first run that fails ends the batch with its exit status: a config error (exit 2) before
anything of it ran, an exception as `harness.run` handles it (MPI_Abort brings the job down).
One signal catcher serves the whole batch and hands a signal to the run in progress.
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

from .ops import signals
from .run import freeze_for_exit


class _Current:
    """The run in progress, for the one signal catcher of the batch."""
    run = None

    @classmethod
    def on_signal(cls, name, signum):
        if cls.run is not None:  # records it, aborts the job and exits
            cls.run.failure.on_signal(name, signum)
        os._exit(128 + signum)  # between two runs: nothing to record


def parse(text: str, source: str) -> list[list[str]]:
    """FILE's runs, or ValueError naming what is wrong with it."""
    try:
        runs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not JSON ({e})") from None
    if not isinstance(runs, list) or not runs or not all(
            isinstance(r, list) and all(isinstance(a, str) for a in r) for r in runs):
        raise ValueError(f"{source}: expected a non-empty JSON list of lists of "
                         f"'key=value' strings")
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if argv[:1] != ["--help"] else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        runs = parse(Path(argv[0]).read_text(), argv[0])
    except (OSError, ValueError) as e:
        print(f"harness.batch: error: {e}", file=sys.stderr, flush=True)
        return 2
    signals.block()  # before MPI and torch start threads: they inherit the blocked mask
    # imported only now, as in harness.run: they start MPI and torch
    from . import run, worker

    worker.Worker.freeze_setup = False
    signals.Catcher(_Current.on_signal).start()
    imported = 0
    for args in runs:
        if len(sys.modules) > imported:
            _freeze_imports()
            imported = len(sys.modules)
        rc = run.main(args, on_run=lambda r: setattr(_Current, "run", r))
        _Current.run = None
        if rc:
            return rc
    return 0


def _freeze_imports() -> None:
    """The objects of the modules imported so far (~2.5 x 10^5 after a run: torch's most) out
    of the garbage collector's reach, as harness.worker.Worker.start freezes a single run's.
    Here only what outlives a run is frozen, after a full collection of what the last run
    left: its own objects hold its model in cycles (hooks, bound methods), and frozen they
    could only be collected after gc.unfreeze(), which would put the imports back in every
    later run's collection (0.1-0.15 s per run and rank). Called before the first run and
    after each run that imported more (torch imports parts lazily; models their modules)."""
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    sys.exit(freeze_for_exit(main()))
