"""The checks harness.run makes for runs across hosts and under Slurm (issue 26), without MPI:
a rank that cannot see the run directory, and srun tasks that MPI did not join. The real jobs
are in test_cluster_mpi.py and test_slurm_mpi.py."""
from pathlib import Path

from harness.ops.session import sees_dir, unreachable
from harness.run import unjoined


def test_a_rank_sees_the_run_directory_only_when_it_exists(tmp_path):
    assert sees_dir(tmp_path)
    assert not sees_dir(tmp_path / "elsewhere", wait_s=0.2)


def test_the_unreachable_run_directory_is_one_line_naming_ranks_hosts_and_the_fix():
    views = [("/tmp/r", "node1", False), ("/tmp/r", "node2", True)]
    msg = unreachable(views, Path("/tmp/r"))
    assert msg == ("rank 1 on node2 cannot write into the run directory /tmp/r that rank 0 "
                   "created on node1: node2 does not have it (no file system shared with node1 "
                   "there); set run.local_dir to a directory every host has (e.g. "
                   "run.local_dir=/tmp/$USER), or run.dir on a file system all hosts share")
    views += [("/tmp/r", "node2", True), ("/tmp/r", "node3", True)]
    msg = unreachable(views, Path("/tmp/r"))
    assert "\n" not in msg
    assert msg.startswith("ranks 1, 2, 3 on node2, node3 cannot write into the run directory")
    assert ": node2 and node3 do not have it" in msg


def test_srun_tasks_that_mpi_did_not_join_are_refused(monkeypatch):
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert unjoined(1) is None                      # plain python, mpirun -n 1
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert unjoined(1) is None                      # srun -n 1
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert unjoined(2) is None                      # srun --mpi=pmi2 -n 2: joined
    msg = unjoined(1)                               # srun --mpi=none -n 2: two worlds of 1
    assert msg.startswith("srun started 2 tasks but MPI sees a world of 1 in each")
    assert "srun --mpi=pmi2" in msg and "\n" not in msg
