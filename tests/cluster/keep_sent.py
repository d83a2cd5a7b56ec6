"""`python keep_sent.py DIR ARGS...`: `python -m harness.run ARGS...`, keeping a copy in DIR of
every file this rank's run.local_dir hands over (harness.localdir.tidy deletes what arrived whole
at rank 0), so that a test can compare the run directory with the bytes the sender had."""
import runpy
import shutil
import sys
from pathlib import Path

from harness.ops import localdir

keep = Path(sys.argv[1])
_tidy = localdir.tidy


def tidy(base, rels):
    for rel in rels:
        (keep / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(base) / rel, keep / rel)
    _tidy(base, rels)


localdir.tidy = tidy
sys.argv = ["harness.run", *sys.argv[2:]]
runpy.run_module("harness.run", run_name="__main__", alter_sys=True)
