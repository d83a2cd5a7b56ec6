"""Two hosts for real (issue 26): MPICH's `mpiexec -f hostfile` starts one rank on each of two
hosts over ssh, and the ranks talk over the veth pair between them (tests/cluster/hosts.py:
network, mount and UTS namespaces, an sshd in each, no /tmp shared). Root only; elsewhere the
tests skip, saying what is missing. One pair of hosts serves the module and is torn down with
everything in it, also when a test fails. No assertion on wall times; every command has a
timeout.
"""
import json
import sys
from pathlib import Path

import pytest
from cluster.hosts import NAMES, TwoHosts
from helpers import REPO, SMALL, meta, trace_frame

from harness import runformat as F

pytestmark = pytest.mark.mpi
KEEP = str(Path(__file__).resolve().parent / "cluster" / "keep_sent.py")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    h = TwoHosts(tmp_path_factory.mktemp("hosts"))
    try:
        yield h.start()
    finally:
        h.stop()


def _env():
    import os
    return dict(os.environ, PYTHONPATH=str(REPO))


def _sent_bytes(run: Path) -> int:
    """Payload bytes of every send in the run's traces (both ranks)."""
    total = 0
    for r in range(meta(run)["world_size"]):
        ev = trace_frame(run, "events", r)
        total += int(ev.loc[ev["kind"] == "send", "bytes"].sum())
    return total


def test_a_run_across_two_hosts_gathers_every_file_on_rank_0_byte_for_byte(hosts):
    before = hosts.link_bytes(0)
    p = hosts.mpiexec([sys.executable, KEEP, "/tmp/sent", *SMALL, "train.steps=4",
                       "run.dir=/tmp/run", "run.local_dir=/tmp/scratch/{host}"],
                      timeout=240, env=_env())
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert p.stdout.strip().splitlines()[-1] == "/tmp/run"
    node1, node2 = hosts.tmp
    run = node1 / "run"                       # on node1; node2 never had it
    assert not (node2 / "run").exists()
    m = meta(run)
    assert m["status"] == "complete", m["error"]
    assert [r["host"] for r in m["ranks"]] == list(NAMES)
    assert [r["local_dir"] for r in m["ranks"]] == [f"/tmp/scratch/{n}/run" for n in NAMES]

    # every file each rank wrote is in the run directory, byte for byte what its sender had
    # (keep_sent copied them just before the sender deleted its own), and the scratch
    # directories are gone
    for r, tmp in enumerate(hosts.tmp):
        sent = tmp / "sent"
        rels = sorted(str(f.relative_to(sent)) for f in sent.rglob("*") if f.is_file())
        assert {f"ranks/rank{r}.log", f"ranks/stats.r{r}.csv", f"ranks/heartbeat.r{r}.json",
                F.trace_file("events", r), F.trace_file("pebbles", r),
                F.trace_file("memory", r)} <= set(rels), rels
        for rel in rels:
            assert (run / rel).read_bytes() == (sent / rel).read_bytes(), (r, rel)
        assert not (tmp / "scratch" / NAMES[r] / "run").exists()
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("blocked.*"))

    # the ranks' traffic went over the veth: at least their payloads and rank 1's files
    files1 = sum(f.stat().st_size for f in (node2 / "sent").rglob("*") if f.is_file())
    assert hosts.link_bytes(0) - before >= _sent_bytes(run) + files1

    # clocks aligned as on one host: both hosts read one clock, so the true offset is 0 and
    # every estimate must be within its own uncertainty (half the round trip) of it
    est = m["clock"]["estimates"]
    assert sorted((e["rank"], e["phase"]) for e in est) == [(1, "end"), (1, "start")]
    for e in est:
        assert 0 < e["rtt_ns"] and abs(e["offset_ns"]) <= e["rtt_ns"] / 2, e
    from analysis import load_run
    from analysis.pebble import main as pebble
    assert not [w for w in load_run(run).warnings if "run.local_dir" in w]
    assert pebble([str(run), "--quiet", "--format", "png", "--no-trace", "--serial"]) == 0
    clock = json.loads((run / "analysis" / "metrics.json").read_text())["clock"]
    assert clock["violations"] == 0 and clock["matched_pairs"] > 0, clock


def test_without_local_dir_the_run_fails_at_once_with_one_line(hosts):
    p = hosts.mpiexec([sys.executable, "-m", "harness.run", *SMALL, "train.steps=4",
                       "run.dir=/tmp/shared"], timeout=120, env=_env())
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [
        "harness.run: error: rank 1 on node2 cannot write into the run directory /tmp/shared "
        "that rank 0 created on node1: node2 does not have it (no file system shared with node1 "
        "there); set run.local_dir to a directory every host has (e.g. run.local_dir=/tmp/$USER), "
        "or run.dir on a file system all hosts share"], p.stderr
    node1, node2 = hosts.tmp
    assert not (node2 / "shared").exists()             # rank 1 made no directory of its own
    assert list((node1 / "shared").iterdir()) == []    # nor did rank 0 write anything
