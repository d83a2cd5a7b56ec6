"""Slurm for real (issue 26): the README's forms on a one-node cluster (tests/cluster/slurm.py:
munged, slurmctld and slurmd from Debian's packages, started and stopped by this module).

- `srun --mpi=pmi2`: Slurm's pmi2 plugin also serves the PMI-1 wire protocol, which PyPI's
  MPICH speaks by default (its MPIR_CVAR_PMI_VERSION=2 fails in MPI_Init against it);
  without a PMI (`--mpi=none`, the MpiDefault here) the harness refuses in one line;
- `mpirun` inside `salloc` and inside `sbatch`: hydra sees the allocation and starts its proxies
  with srun (its slurm launcher), so the ranks run in a job step;
- `sbatch` with a time limit (SIGTERM, recorded as Terminated) and `--signal=USR1@60` (every
  rank reports what it is doing, one diagnosis is printed and recorded, then Terminated).

Slurm checks time limits every 30 s: SIGTERM comes 0-30 s after the limit, and the warning
signal when at most N + 30 s are left. Those two jobs take about a minute each, so they are
submitted before the suite's first test (tests/conftest.py) and wait while the suite runs. Root only; elsewhere the tests skip,
saying what is missing. No assertion on wall times; every command and wait has a timeout.
"""
import sys

import pytest
from helpers import SMALL, meta

from harness import runformat as F

pytestmark = pytest.mark.mpi
PY = sys.executable
MPIRUN = f"{sys.executable.rsplit('/', 1)[0]}/mpirun"
# the `slurm` fixture (tests/conftest.py, session-scoped): the cluster, and the two sbatch jobs
# submitted before the suite's first test, so that their minute passes while the suite runs


def test_srun_with_pmi2_runs_the_pipeline(slurm):
    run = slurm.root / "runs" / "srun"
    p = slurm.run(["srun", "--mpi=pmi2", "--ntasks=2", PY, "-m", "harness.run", *SMALL,
                   "train.steps=4", f"run.dir={run}", f"run.local_dir={slurm.root}/scratch"],
                  timeout=240)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    m = meta(run)
    assert m["status"] == "complete" and m["world_size"] == 2, m["error"]
    assert len({r["pid"] for r in m["ranks"]}) == 2
    assert all(r["local_dir"] == f"{slurm.root}/scratch/srun" for r in m["ranks"])
    for r in (0, 1):
        assert (run / F.trace_file("events", r)).stat().st_size > 0
    assert not (slurm.root / "scratch" / "srun").exists()


def test_srun_without_a_pmi_is_refused_in_one_line(slurm):
    run = slurm.root / "runs" / "nopmi"
    p = slurm.run(["srun", "--mpi=none", "--ntasks=2", PY, "-m", "harness.run", *SMALL,
                   f"run.dir={run}"], timeout=120)
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    ours = [ln for ln in p.stderr.splitlines() if not ln.startswith("srun: ")]
    assert ours == ["harness.run: error: srun started 2 tasks but MPI sees a world of 1 in each "
                    "(Slurm's PMI did not join them): use srun --mpi=pmi2 (PyPI's MPICH speaks "
                    "it), or mpirun inside salloc/sbatch"], p.stderr
    assert not run.exists()


def test_mpirun_inside_salloc_starts_the_ranks_in_a_job_step(slurm):
    run = slurm.root / "runs" / "salloc"
    script = slurm.root / "salloc.sh"
    script.write_text(f"{MPIRUN} -n 2 sh -c 'echo in step $SLURM_JOB_ID.$SLURM_STEP_ID' && "
                      f"{MPIRUN} -n 2 {PY} -m harness.run {' '.join(SMALL)} train.steps=4 "
                      f"run.dir={run}\n")
    p = slurm.run(["salloc", "--ntasks=2", "bash", str(script)], timeout=240)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    steps = [ln for ln in p.stdout.splitlines() if ln.startswith("in step ")]
    assert len(steps) == 2 and len(set(steps)) == 1 and steps[0].endswith(".0"), p.stdout
    m = meta(run)
    assert m["status"] == "complete" and m["world_size"] == 2, m["error"]


def test_sbatch_signal_usr1_reports_what_every_rank_does_then_ends_the_run(slurm):
    job = slurm.jobs["usr1"]
    state = slurm.wait(job, timeout=300)
    out = slurm.output("usr1", job)
    assert state == "FAILED", (state, out)           # ended by the signal, not the time limit
    err = meta(slurm.root / "runs" / "usr1")["error"]
    assert err["type"] == "Terminated" and err["message"] == "terminated by SIGUSR1 at step 2", err
    diag = err["diagnosis"]
    assert diag.startswith("hang: rank 0 waits to send A2.0 to rank 1; ") or \
        diag.startswith("hang: rank 0 waits for G2.0 from rank 1; "), diag
    assert "rank 1 is not in a communication call (before its first action of step 2" in diag
    assert diag.endswith("rank 1 holds the others up"), diag
    assert out.count("] hang: ") == 1 and f"[rank 0] {diag}" in out, out


def test_sbatch_time_limit_sends_sigterm_recorded_as_terminated(slurm):
    job = slurm.jobs["term"]
    state = slurm.wait(job, timeout=300)
    out = slurm.output("term", job)
    assert state == "TIMEOUT", (state, out)
    # the ranks ran in the job's first step: hydra started them with srun
    assert f"STEP {job}.0 ON {slurm.node} CANCELLED" in out and "DUE TO TIME LIMIT" in out, out
    err = meta(slurm.root / "runs" / "term")["error"]
    assert err["type"] == "Terminated" and err["message"] == "terminated by SIGTERM at step 2", err
    assert "harness.run: error: terminated by SIGTERM at step 2; aborting the job" in out, out
