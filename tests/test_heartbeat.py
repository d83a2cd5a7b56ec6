"""harness.ops.heartbeat.judge on hand-made run directories: dead only when it must be."""
import json
import os
import socket

import psutil

from harness.ops import heartbeat


def _run(tmp_path, host, pid, start, t, step=4, step_time=0.5, status="running"):
    (tmp_path / "ranks").mkdir(exist_ok=True)
    meta = {"status": status, "ranks": [{"rank": 0, "host": host, "pid": pid}]}
    (tmp_path / "ranks" / "heartbeat.r0.json").write_text(json.dumps(
        {"rank": 0, "host": host, "pid": pid, "pid_start": start, "step": step, "time": t,
         "step_time": step_time, "timeout_s": 120}).ljust(heartbeat.SIZE))
    return meta


def test_a_live_local_process_is_alive_whatever_its_heartbeat_age(tmp_path):
    me = psutil.Process()
    meta = _run(tmp_path, socket.gethostname(), os.getpid(), me.create_time(), t=0.0)
    assert heartbeat.judge(tmp_path, meta, now=1e12) is None


def test_a_gone_or_reused_local_pid_is_dead(tmp_path):
    me = psutil.Process()
    meta = _run(tmp_path, socket.gethostname(), os.getpid(), me.create_time() - 50, t=100.0)
    assert heartbeat.judge(tmp_path, meta, now=112.0) == "died: rank 0 last seen at step 4, 12 s ago"


def test_a_remote_rank_is_dead_only_when_its_heartbeat_is_long_stale(tmp_path):
    meta = _run(tmp_path, "elsewhere", 1, 1.0, t=1000.0, step_time=60.0)
    margin = max(heartbeat.STALE_MIN_S, 20 * 60.0, 2 * 120)
    assert heartbeat.judge(tmp_path, meta, now=1000.0 + margin - 1) is None
    assert heartbeat.judge(tmp_path, meta, now=1000.0 + margin + 1).startswith(
        "died: rank 0 last seen at step 4")


def test_finished_runs_and_runs_without_heartbeats_are_never_judged(tmp_path):
    meta = _run(tmp_path, socket.gethostname(), 2**22 + 7, 1.0, t=0.0, status="complete")
    assert heartbeat.judge(tmp_path, meta, now=1e12) is None
    (tmp_path / "ranks" / "heartbeat.r0.json").unlink()
    meta = {"status": "running", "ranks": [{"rank": 0, "host": "elsewhere", "pid": 5}]}
    assert heartbeat.judge(tmp_path, meta, now=1e12) is None
