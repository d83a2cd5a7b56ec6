"""Faults on real `mpirun -n 2` jobs: signals, a SIGKILLed rank, divergence, a full disk.

Every job is started in its own session and, whatever happens, killed with all its processes in
a `finally` (hydra starts each rank in a session of its own, so the ranks are found through the
process tree and meta.json, not through mpirun's process group). No assertion on wall times;
every wait has a timeout.
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import REPO, SMALL, meta, run_harness

from analysis import load_run
from harness.ops import heartbeat
from harness.ops.launch import mpirun

LONG = ["train.steps=100000", "comm.timeout_s=30"]
# the `job` fixture launches mpirun through Job, which conftest's source scan cannot see
pytestmark = pytest.mark.mpi


def _default_signals():
    """The job starts with default signal dispositions, whatever the test runner inherited (under
    `nohup` SIGHUP is ignored, and mpirun would inherit that and never die of it)."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)


class Job:
    """A real `mpirun -n 2 python -m harness.run ...` in the background."""

    def __init__(self, run_dir, *args, n=2):
        self.run_dir, self.n = run_dir, n
        self.err = open(run_dir.parent / f"{run_dir.name}.stderr", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [mpirun(), "-n", str(n), sys.executable, "-m", "harness.run", *SMALL, *args,
             f"run.dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=self.err,
            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, start_new_session=True,
            preexec_fn=_default_signals)
        self.procs = []  # every process of the job seen so far (psutil checks pid reuse)

    def wait_step(self, step: int, timeout: float = 120):
        """Until every rank's heartbeat says it completed `step`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"job ended early:\n{self.stderr()}"
            self._collect()
            beats = [heartbeat.read(heartbeat.path(self.run_dir, r)) for r in range(self.n)]
            if all(b and b["step"] >= step for b in beats) and (self.run_dir / "meta.json").exists():
                return [b["pid"] for b in beats]
            time.sleep(0.1)
        raise AssertionError(f"no rank reached step {step} in {timeout} s:\n{self.stderr()}")

    def _collect(self):
        try:
            self.procs += psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            pass

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def kill(self):
        """Everything the job started, then mpirun's session."""
        for p in self.procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        # until each is gone or a zombie (psutil.wait_procs would wait, polling ever more
        # slowly, for the init process to reap zombies it has adopted: ~2 s a test)
        _wait_gone(self.procs, 30)
        self.err.close()


def _alive(p) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs, timeout: float) -> list:
    """Until each of procs is gone or a zombie (dead, not yet reaped by the init process that
    adopted it, which psutil.wait_procs waits for); -> those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(map(_alive, procs)):
        time.sleep(0.02)
    return [p for p in procs if _alive(p)]


@pytest.fixture
def job(tmp_path):
    jobs = []

    def start(*args, **kw):
        jobs.append(Job(tmp_path / f"r{len(jobs)}", *args, **kw))
        return jobs[-1]
    yield start
    for j in jobs:
        j.kill()
    for j in jobs:  # nothing the jobs started may outlive the test
        for p in j.procs:
            assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p


@pytest.mark.parametrize("sig, target", [
    (signal.SIGTERM, "mpirun"),   # a batch scheduler's time limit; mpirun forwards it
    (signal.SIGINT, "mpirun"),    # Ctrl-C
    (signal.SIGUSR1, "mpirun"),   # a scheduler's early warning
    (signal.SIGHUP, 0),           # sent to one rank
    (signal.SIGUSR2, 1),
])
def test_a_signal_ends_the_run_as_a_recorded_failure(job, sig, target):
    j = job(*LONG)
    pids = j.wait_step(1)
    os.kill(j.proc.pid if target == "mpirun" else pids[target], sig)
    rc = j.wait()
    assert rc != 0
    m = meta(j.run_dir)
    name = signal.Signals(sig).name
    assert m["status"] == "failed" and m["error"]["type"] == "Terminated", m
    assert m["error"]["message"].startswith(f"terminated by {name} at step ")
    err = j.stderr()
    # each rank that got it says it in one line; mpirun may drop the output of a rank that the
    # abort kills, so at least one such line, and never a traceback
    # (a peer whose transfer the abort broke names the first failure: Run.failed_first)
    assert f"harness.run: error: terminated by {name} at step " in err or \
        "harness.run: error: died: rank" in err or \
        f"failed first (Terminated: terminated by {name} at step " in err, err
    assert "Traceback" not in err
    assert not list((j.run_dir).glob("**/.*.tmp"))


def _assert_died(run_dir, rank=None):
    """Either nothing could be recorded (meta.json stays "running", the loader says "died"),
    or mpirun SIGTERMed a survivor first, which recorded the death it saw (type Died)."""
    # nor is the 256 KiB disk reserve of any rank left (its file has no name: harness.ops.rundir)
    assert not list(run_dir.rglob(".reserve*")), list(run_dir.rglob(".*"))
    run = load_run(run_dir)
    msg = run.meta["error"]["message"]
    assert msg.startswith("died: rank ") and " last seen at step " in msg and " s ago" in msg
    if rank is not None:
        assert msg.startswith(f"died: rank {rank} ")
    from experiments.sweep import status_of
    if run.meta["status"] == "failed":
        assert run.meta["error"]["type"] == "Died" and status_of(run_dir) == "failed"
        return
    assert run.meta["status"] == "died"
    assert any(w.startswith("run status is 'died': died: rank") for w in run.warnings)
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "running"  # untouched
    assert status_of(run_dir) == "died"


def test_a_sigkilled_rank_is_reported_dead_not_running(job):
    j = job(*LONG)
    pids = j.wait_step(1)
    alive = load_run(j.run_dir)
    assert alive.meta["status"] == "running"   # never guess dead for a live run
    os.kill(pids[1], signal.SIGKILL)
    assert j.wait() != 0
    _assert_died(j.run_dir)


def test_sighup_to_mpirun_kills_the_ranks_uncatchably_and_is_reported_dead(job):
    """MPICH's mpirun dies of SIGHUP and its proxies SIGKILL the ranks: nothing can be
    recorded then, so the heartbeats tell it afterwards."""
    j = job(*LONG)
    j.wait_step(1)
    os.kill(j.proc.pid, signal.SIGHUP)
    j.wait()
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in j.procs) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    _assert_died(j.run_dir)


def test_divergence_stops_the_run_naming_step_and_rank(tmp_path):
    d = tmp_path / "r"
    proc = run_harness(2, *SMALL, "train.steps=10", "train.lr=1e6", f"run.dir={d}", timeout=120)
    assert proc.returncode != 0
    m = meta(d)
    assert m["status"] == "failed" and m["error"]["type"] == "Diverged", m
    msg = m["error"]["message"]
    assert msg.startswith("diverged: non-finite ") and " at step " in msg and " on rank " in msg
    # every rank that saw it says it; the first to record it is in meta.json
    assert "harness.run: error: diverged: non-finite " in proc.stderr
    assert "Traceback" not in proc.stderr
    run = load_run(d)
    assert any("Diverged: diverged" in w for w in run.warnings)
    assert any(w.startswith("training diverged: non-finite") for w in run.warnings)


def test_divergence_can_be_studied_and_is_still_recorded(tmp_path):
    d = tmp_path / "r"
    proc = run_harness(2, *SMALL, "train.steps=6", "train.lr=1e6",
                       "train.stop_on_nonfinite=false", f"run.dir={d}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = meta(d)
    assert m["status"] == "complete"
    nf = m["nonfinite"]
    assert 0 <= nf["step"] < 6 and nf["rank"] in (0, 1)
    assert proc.stderr.count("training goes on") >= 1   # said even with quiet=true
    run = load_run(d)
    assert [w for w in run.warnings if w.startswith("training diverged")]


def test_a_killed_sweep_runner_takes_its_job_down(tmp_path):
    """SIGKILL to `python -m experiments.sweep`: its mpirun gets SIGTERM (parent-death signal)
    and forwards it, so the ranks record it and nothing is left running."""
    spec = {"sweep": {"name": "k", "base": "deep_mlp", "repeats": 1, "ranks": [2],
                      "fixed": dict(a.split("=") for a in SMALL + LONG if a != "quiet=true")}}
    f = tmp_path / "k.yaml"
    f.write_text(json.dumps(spec))
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, "-m", "experiments.sweep", str(f), "--out",
                               str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO,
                              start_new_session=True)
    family = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert runner.poll() is None, runner.stderr.read()
            beats = [heartbeat.read(p) for p in out.glob("runs/*/ranks/heartbeat.r*.json")]
            if len(beats) == 2 and all(b and b["step"] >= 1 for b in beats):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the sweep's job never reached step 1")
        family = psutil.Process(runner.pid).children(recursive=True)
        assert len(family) >= 3                      # mpirun, its proxy, the ranks
        runner.kill()
        runner.wait(timeout=30)
        alive = _wait_gone(family, 60)
        assert not alive, f"left running after the sweep runner died: {alive}"
        run_dir = next(out.glob("runs/*-r0"))
        m = meta(run_dir)
        assert m["status"] == "failed" and m["error"]["message"].startswith(
            "terminated by SIGTERM at step "), m
    finally:
        for p in family:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        runner.wait(timeout=30)
        runner.stderr.close()
        _wait_gone(family, 30)


def test_a_full_disk_is_a_recorded_failure_with_no_half_state(tmp_path):
    from helpers import small_tmpfs
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        d = disk / "r"
        proc = run_harness(2, *SMALL, *LONG, f"run.dir={d}", timeout=120)
        assert proc.returncode != 0
        m = meta(d)
        assert m["status"] == "failed", m
        assert m["error"]["message"].startswith(f"disk full: no space left on the device of {d}")
        assert "harness.run: error: disk full" in proc.stderr
        assert "Traceback" not in proc.stderr and "could not record" not in proc.stderr
        assert not [p for p in d.rglob("*") if p.name.endswith(".tmp")
                    or p.name.startswith(".reserve")], list(d.rglob(".*"))
        run = load_run(d)               # what was written before the disk filled is readable
        assert run.meta["status"] == "failed" and len(run.stats) > 0
