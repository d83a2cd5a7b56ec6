import inspect
import re
import sys
from pathlib import Path

import pytest

# tests/ on sys.path so tests can `import helpers`
sys.path.insert(0, str(Path(__file__).resolve().parent))

# What launches real multi-process jobs: the harness under mpirun (helpers.run_harness,
# harness.ops.launch) or torchrun (helpers.run_torch), or a sweep with its real launcher. A test
# whose own code or any of its fixtures' code says one of these gets the `mpi` marker, so
# `pytest -m "not mpi"` is the fast, pure tier; so does every test of a `*_mpi.py` module (where
# launching hides in a helper class).
_LAUNCHES = re.compile(r"\b(run_harness|run_torch|launch|mpirun|torchrun)\s*\("
                       r"|run_sweep\((?![^)]*launcher=)")


def pytest_configure(config):
    config.addinivalue_line("markers", "mpi: launches mpirun (set automatically by conftest.py)")


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name.endswith("_mpi.py"):
            item.add_marker(pytest.mark.mpi)
            continue
        fns = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for defs in (info.name2fixturedefs.values() if info else ()):
            fns += [d.func for d in defs]
        if any(_LAUNCHES.search(_source(f)) for f in fns if f is not None):
            item.add_marker(pytest.mark.mpi)
