import gc
import inspect
import os
import re
import sys
from pathlib import Path

import pytest

# tests/ on sys.path so tests can `import helpers`
sys.path.insert(0, str(Path(__file__).resolve().parent))

# What launches processes: the harness under mpirun, torchrun or alone (helpers.run_harness,
# run_torch, run_batch, Batches, harness.ops.launch), a sweep with its real launcher, or any
# other command. A test whose own code or any of its fixtures' code says one of these gets the
# `mpi` marker, so `pytest -m "not mpi"` is the fast tier, in one process; so does every test of
# a `*_mpi.py` module (where launching hides in a helper class), and a test marked by hand.
_LAUNCHES = re.compile(r"\b(run_harness|run_torch|run_batch|Batches|launch|mpirun|torchrun)\s*\(|"
                       r"run_sweep\((?![^)]*launcher=)|subprocess\.(run|Popen)\(")


def pytest_configure(config):
    # a pytest-xdist worker shares the cores with the others: torch's threads are its share
    # (two workers of two threads each on two cores spin against each other, ~5x slower)
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch  # the workers only: imported by the tests anyway

        from harness.config import cores_available
        torch.set_num_threads(max(1, cores_available() // int(workers)))
    config.addinivalue_line("markers", "mpi: launches processes: mpirun jobs, the harness, a "
                            "command (set automatically by conftest.py)")


_SAYS: dict = {}    # function -> whether its source launches (one getsource per function)


def _launches(fn) -> bool:
    if fn not in _SAYS:
        try:
            _SAYS[fn] = bool(_LAUNCHES.search(inspect.getsource(fn)))
        except (OSError, TypeError):
            _SAYS[fn] = False
    return _SAYS[fn]


def pytest_ignore_collect(collection_path, config):
    # `-m "not mpi"`: a `*_mpi.py` module's tests are all deselected (below), so it is not
    # imported at all (~0.4 s of a worker's ~5 s collection)
    if collection_path.name.endswith("_mpi.py") and \
            " ".join((config.option.markexpr or "").split()) == "not mpi":
        return True
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name.endswith("_mpi.py"):
            item.add_marker(pytest.mark.mpi)
            continue
        fns = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for defs in (info.name2fixturedefs.values() if info else ()):
            fns += [d.func for d in defs]
        if any(_launches(f) for f in fns if f is not None):
            item.add_marker(pytest.mark.mpi)


def pytest_collection_finish(session):
    # helpers.Batches: the modules whose tests run this session (their declared runs are made
    # together, one job per world size; a module deselected has its runs left out)
    import helpers
    helpers.SESSION["modules"] = {item.module.__name__ for item in session.items
                                  if getattr(item, "module", None) is not None}


@pytest.fixture(scope="session", autouse=True)
def _batch_folder(tmp_path_factory):
    import helpers
    helpers.SESSION["base"] = tmp_path_factory.mktemp("batches")


# -- the Slurm cluster of tests/test_slurm_mpi.py ------------------------------------------------
# Its two sbatch jobs wait about a minute each for Slurm's 30 s clock (a time limit, a warning
# signal). Submitted before the suite's first test, that minute passes while the suite runs.
# runs that last until a signal ends them: rank 1 stalls at step 2 (sleeping), rank 0 waits for
# it, sleeping between tests (comm.wait=sleep), so that the minute costs no CPU; the signals come
# within ~95 s, and comm.timeout_s ends an orphaned job (a killed test run) after 4 minutes
UNTIL_SIGNALLED = ["train.steps=100000", "comm.timeout_s=240", "comm.wait=sleep",
                   "comm.poll_us=5000", "debug.stall_rank=1", "debug.stall_step=2"]


def _sbatch_script(sbatch: str, launch: str, run_dir, *args: str) -> str:
    from helpers import SMALL
    return (f"#!/bin/bash\n#SBATCH {sbatch}\n{launch} {sys.executable} -m harness.run "
            f"{' '.join([*SMALL, *args])} run.dir={run_dir}\n")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster (tests/cluster/slurm.py) with the two long sbatch jobs submitted
    (`slurm.jobs`); skips, naming what is missing, without root or Slurm's packages."""
    from cluster.slurm import Slurm
    from helpers import REPO
    mpirun = f"{sys.executable.rsplit('/', 1)[0]}/mpirun"
    s = Slurm(tmp_path_factory.mktemp("slurm"), REPO)
    try:
        s.start()
        runs = s.root / "runs"
        s.jobs = {
            "usr1": s.sbatch("usr1", _sbatch_script("--ntasks=2 --time=2 --signal=USR1@60",
                                                    "srun --mpi=pmi2", runs / "usr1",
                                                    *UNTIL_SIGNALLED)),
            "term": s.sbatch("term", _sbatch_script("--ntasks=2 --time=1", f"{mpirun} -n 2",
                                                    runs / "term", *UNTIL_SIGNALLED))}
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session", autouse=True)
def _slurm_jobs_first(request):
    """Starts the cluster and its jobs before the first test when the Slurm tests are selected
    (a skip or an error is kept for them: pytest raises it again in each Slurm test that asks
    for the fixture; no other test is touched)."""
    if any(item.path.name == "test_slurm_mpi.py" for item in request.session.items):
        try:
            request.getfixturevalue("slurm")
        except (Exception, pytest.skip.Exception):
            pass


def pytest_unconfigure(config):
    # the session is over: the objects left (~10^6 after torch, pandas and matplotlib) out of
    # the collector's reach, so the interpreter's exit does not walk them in its last
    # collections (~0.7 s of each process's exit here; it frees what it frees by refcount)
    gc.freeze()
