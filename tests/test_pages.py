"""analysis/pages.py: the analysis's arrays on small pages.

The independent check is the kernel's own count of the process's transparent huge pages
(AnonHugePages in /proc/self/smaps_rollup) after a fresh interpreter fills a 64 MiB array."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.synthetic import make_run

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ROLLUP = Path("/proc/self/smaps_rollup")

PROBE = r"""
import json, sys
import numpy as np
from analysis.pages import small_pages
def huge_kib():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
a = np.ones(8 << 20); before = huge_kib(); del a          # 64 MiB, numpy's default
was = small_pages()
b = np.ones(8 << 20); after = huge_kib(); del b
print(json.dumps({"before": before, "after": after, "was": was}))
"""


def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.mpi  # launches a process (probe)
@pytest.mark.skipif(not (THP.exists() and "[madvise]" in THP.read_text() and ROLLUP.exists()),
                    reason="the kernel gives huge pages on request only in THP 'madvise' mode")
def test_arrays_after_small_pages_get_no_huge_pages():
    r = probe()
    assert r["was"] is True                         # numpy had been asking for them
    assert r["before"] >= 32 << 10, r               # the kernel gave most of the 64 MiB as THP
    assert r["after"] <= r["before"] - (32 << 10), r   # the new array got none of its own


def test_an_explicit_numpy_setting_wins():
    env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE="1")
    code = ("from analysis.pages import numpy_multiarray, small_pages; small_pages(); "
            "print(numpy_multiarray()._set_madvise_hugepage(True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env=env)
    assert out.stdout.strip() == "True"             # still asking, as the user chose


def test_analysis_pebble_turns_them_off(tmp_path):
    run = make_run(tmp_path / "run", p=2, m=2, schedule="1f1b", steps=3)
    code = ("import sys; from analysis.pebble import main; "
            f"rc = main([{str(run)!r}, '--format', 'png', '-q', '--no-trace']); "
            "from analysis.pages import numpy_multiarray as m; "
            "print(rc, m()._set_madvise_hugepage(True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "0 False"
