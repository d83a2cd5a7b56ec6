"""Real `mpirun -n 2` jobs for issue 15: hangs explained, no shared file system, Kineto merged.

Jobs run through test_faults_mpi's `job` fixture (own session, every process killed in a
`finally`, nothing left behind). No assertion on wall times; every wait has a timeout.
"""
import json
import shutil

import pytest
from helpers import meta
from test_faults_mpi import job  # noqa: F401 - the fixture

from analysis import load_run
from harness import runformat as F

pytestmark = pytest.mark.mpi
HANG = ["train.steps=6", "comm.timeout_s=3"]


def test_a_mismatched_schedule_is_diagnosed_as_a_cycle(job):
    j = job(*HANG, "debug.mismatch_rank=0", "debug.mismatch_step=1")
    assert j.wait(timeout=120) != 0
    m = meta(j.run_dir)
    assert m["status"] == "failed" and m["error"]["type"] == "CommTimeout", m
    # rank 0 receives the gradient before it sent the activation; rank 1 waits for that
    want = ("hang: rank 0 waits for G1.0 from rank 1; rank 1 waits for A1.0 from rank 0: "
            "a cycle (0 -> 1 -> 0)")
    assert m["error"]["diagnosis"].startswith(want), m["error"]
    err = j.stderr()
    assert err.count("] hang: ") == 1, err          # one diagnosis for the job
    assert want in err
    # both ranks answered: each wrote its report while blocked
    for r, op in ((0, "recv"), (1, "recv")):
        rec = json.loads((j.run_dir / "ranks" / f"blocked.r{r}.json").read_text())
        assert rec["step"] == 1 and rec["blocked"]["op"] == op and rec["blocked"]["peer"] == 1 - r


def test_a_stalled_rank_is_named_as_the_one_holding_the_others_up(job):
    j = job(*HANG, "debug.stall_rank=1", "debug.stall_step=2")
    assert j.wait(timeout=120) != 0
    diag = meta(j.run_dir)["error"]["diagnosis"]
    assert diag.startswith("hang: rank 0 waits to send A2.0 to rank 1; ") or \
        diag.startswith("hang: rank 0 waits for G2.0 from rank 1; "), diag
    assert "rank 1 is not in a communication call (before its first action of step 2" in diag
    assert diag.endswith("rank 1 holds the others up"), diag


def test_a_stopped_rank_cannot_answer_and_is_named_the_missing_peer(job):
    import os
    import signal
    j = job("train.steps=100000", "comm.timeout_s=3")
    pids = j.wait_step(1)
    os.kill(pids[1], signal.SIGSTOP)      # its watchdog thread stops too: no report
    assert j.wait(timeout=120) != 0
    diag = meta(j.run_dir)["error"]["diagnosis"]
    assert diag.startswith("hang: rank 0 waits "), diag
    assert "rank 1 did not report" in diag and diag.endswith("the missing peer is rank 1"), diag


def test_sigusr1_reports_what_every_rank_is_doing_before_it_ends_the_run(job):
    import os
    import signal
    j = job("train.steps=100000", "comm.timeout_s=8")
    j.wait_step(1)
    os.kill(j.proc.pid, signal.SIGUSR1)   # mpirun forwards it to every rank
    assert j.wait(timeout=120) != 0
    err = meta(j.run_dir)["error"]
    assert err["type"] == "Terminated" and err["message"].startswith("terminated by SIGUSR1")
    # a healthy job: both ranks answer, each with what it is doing
    assert err["diagnosis"].startswith("hang: rank 0 "), err
    assert "rank 1 " in err["diagnosis"] and "did not report" not in err["diagnosis"], err


def test_local_dirs_travel_to_rank_0_checked_and_kineto_is_merged(job, tmp_path):
    loc = tmp_path / "local"
    j = job("train.steps=4", f"run.local_dir={loc}/{{rank}}", "debug.no_shared_fs=true",
            "trace.kineto=1:2", "run.save_weights=true")
    assert j.wait(timeout=180) == 0, j.stderr()
    d = j.run_dir
    m = meta(d)
    assert m["status"] == "complete"
    # rank 1 was never told the run directory (debug.no_shared_fs): everything of it there
    # came over MPI, and the scratch directories are empty now
    for r in (0, 1):
        for rel in (F.trace_file("events", r), f"trace/kineto.r{r}.json", f"ranks/rank{r}.log",
                    f"ranks/stats.r{r}.csv", f"ranks/heartbeat.r{r}.json",
                    f"ranks/weights.r{r}.pt"):
            assert (d / rel).stat().st_size > 0, rel
        assert m["ranks"][r]["local_dir"] == str(loc / str(r) / d.name)
        assert not (loc / str(r) / d.name).exists()
    assert not list(d.rglob("*.tmp")) and not list(d.rglob("blocked.*"))
    run = load_run(d)
    assert run.steps == [0, 1, 2, 3] and not [w for w in run.warnings if "run.local_dir" in w]

    # Kineto's operators merged into trace.json under our spans, on the aligned clock
    from analysis.pebble import main as pebble
    assert pebble([str(d), "--quiet", "--format", "png"]) == 0
    ev = json.loads((d / "analysis" / "trace.json").read_text())["traceEvents"]
    kin = [e for e in ev if str(e.get("cat", "")).startswith("kineto.")]
    steps = {(e["pid"], e["args"]["step"]): (e["ts"], e["ts"] + e["dur"])
             for e in ev if e.get("cat") == "step"}
    for r in (0, 1):
        fwd = [e for e in kin if e["pid"] == r and e["name"] == f"PP:{r}F0"]
        assert len(fwd) == 2, fwd                         # steps 1 and 2 only
        ops = [e for e in kin if e["pid"] == r and e["cat"] == "kineto.cpu_op"
               and e["name"] in ("aten::addmm", "aten::mm", "aten::linear")]
        assert ops
        for e in fwd + ops:  # each inside rank r's step 1 or 2 (1 ms slack for the anchors)
            assert any(a - 1000 <= e["ts"] and e["ts"] + e["dur"] <= b + 1000
                       for (p, s), (a, b) in steps.items() if p == r and s in (1, 2)), e

    # a rank whose files never arrived: the loader says where they stay
    dead = tmp_path / "dead"
    shutil.copytree(d, dead)
    for p in dead.glob("trace/*.r1.*"):
        p.unlink()
    warn = [w for w in load_run(dead).warnings if "run.local_dir" in w]
    assert warn == [(f"rank 1: its files were not moved to the run directory; they stay in "
                     f"{m['ranks'][1]['host']}:{loc / '1' / d.name} (run.local_dir)")]


def test_on_a_failure_local_files_reach_the_run_directory_as_far_as_they_can(job, tmp_path):
    loc = tmp_path / "local"
    j = job("train.steps=6", f"run.local_dir={loc}/{{rank}}", "debug.fail_rank=1",
            "debug.fail_step=2")
    assert j.wait(timeout=120) != 0
    d = j.run_dir
    m = meta(d)
    assert m["status"] == "failed" and m["error"]["rank"] == 1, m
    # the failing rank reaches the run directory through the file system: its files are there
    assert (d / F.trace_file("events", 1)).stat().st_size > 0
    assert "FAILED: injected failure" in (d / "ranks" / "rank1.log").read_text()
    # rank 0 was brought down by the abort: its files are either there or, where they stay, named
    run = load_run(d)
    here = (d / F.trace_file("events", 0)).exists()
    notes = [w for w in run.warnings if w.startswith("rank 0: its files were not moved")]
    assert here or (notes and (loc / "0" / d.name / F.trace_file("events", 0)).exists()), \
        run.warnings
