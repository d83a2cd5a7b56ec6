"""The disk reserve (harness.ops.rundir.reserve): 256 KiB a rank holds to record a failure on a
full disk, held by an open file without a name, so a killed rank leaves nothing behind. On a
small tmpfs, where its blocks can be counted."""
import os
import signal
import subprocess
import sys

from harness.ops import rundir
from helpers import REPO, small_tmpfs

HOLD = ("import sys, time; from pathlib import Path; from harness.ops import rundir; "
        "rundir.reserve(Path(sys.argv[1]), 3); print('held', flush=True); time.sleep(600)")


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_killed_rank_leaves_no_reserve_and_its_space_comes_back(tmp_path):
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "ranks").mkdir()
        before = _free(disk)
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(disk)], stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            assert proc.stdout.readline() == "held\n"
            assert before - _free(disk) >= rundir.RESERVE_BYTES   # the blocks are held ...
            assert not list(disk.rglob("*.r3")), list(disk.rglob("*"))  # ... by no name
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.stdout.close()
        assert [p.name for p in disk.rglob("*")] == ["ranks"]
        assert _free(disk) == before


def test_release_and_a_recorded_failure_give_the_space_back(tmp_path):
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "ranks").mkdir()
        before = _free(disk)
        rundir.reserve(disk, 0)
        assert before - _free(disk) >= rundir.RESERVE_BYTES
        rundir.release(disk, 0)
        assert _free(disk) == before
        rundir.reserve(disk, 1)
        (disk / "ranks" / ".reserve.r7").write_bytes(b"\0" * 4096)  # left by an older harness
        rundir.mark_failed(disk, 1, "RuntimeError", "boom")
        assert sorted(p.name for p in disk.rglob("*")) == ["meta.json", "ranks"]
        assert before - _free(disk) < rundir.RESERVE_BYTES
