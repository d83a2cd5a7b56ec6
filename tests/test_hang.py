"""Pure tests for issue 15: the hang diagnosis, the mismatch knob, profiler range names, the
local-dir transfer's checks and the Kineto merge (no MPI)."""
import json
import os
import time

import pandas as pd
import pytest

from harness import config
from harness import schedule as S
from harness.ops import debug_knobs, hang, localdir
from harness.ops.watchdog import Where
from harness.schedule import simulate
from harness.trace import ranges


def _rep(rank, step=3, blocked=None, action=None, stuck=4.0):
    return {"rank": rank, "step": step, "action": action, "blocked": blocked, "stuck_s": stuck}


def _b(op, peer, pair):
    return {"op": op, "peer": peer, "tag": 1, "pair": pair, "step": 3, "mb": 1}


def test_diagnosis_of_a_cycle_names_both_waits():
    reps = {0: _rep(0, blocked=_b("recv", 1, "G3.1.1>0")),
            1: _rep(1, blocked=_b("recv", 0, "A3.2.0>1"))}
    d = hang.diagnose(reps, 2)
    assert d.startswith("hang: rank 0 waits for G3.1 from rank 1; rank 1 waits for A3.2 from "
                        "rank 0: a cycle (0 -> 1 -> 0)")


def test_diagnosis_names_the_missing_peer_and_the_busy_one():
    # 3 ranks: 0 sends to 1 (rendezvous), 1 waits for 2, 2 never reported
    reps = {0: _rep(0, blocked=_b("send", 1, "A3.0.0>1")),
            1: _rep(1, blocked=_b("wait_recv", 2, "G3.0.2>1"))}
    d = hang.diagnose(reps, 3)
    assert "rank 0 waits to send A3.0 to rank 1" in d and "rank 1 waits for G3.0 from rank 2" in d
    assert "rank 2 did not report" in d and d.endswith("the missing peer is rank 2")
    reps[2] = _rep(2, action="fwd1", stuck=7.25)
    d = hang.diagnose(reps, 3)
    assert "rank 2 is not in a communication call (in fwd1 of step 3 for 7.2 s)" in d
    assert d.endswith("rank 2 holds the others up")


def test_reports_are_written_in_place_and_only_fresh_ones_count(tmp_path):
    bases = [tmp_path / "a", tmp_path / "b"]
    reps = [hang.Reporter(bases[r], r, bases, threshold=0.1, fresh_s=5) for r in (0, 1)]
    w = Where()
    w.at(2, S.Action(S.RECV_GRAD, 0))
    reps[0].write(w, _b("recv", 1, "G2.0.1>0"), 3.0, trigger="watchdog")
    reps[0].write(w, _b("recv", 1, "G2.0.1>0"), 3.5)           # the trigger sticks
    reps[1].write(w, None, 1.0)
    got = reps[0].collect()
    assert got[0]["trigger"] == "watchdog" and got[0]["action"] == "recv_grad0"
    assert got[1]["blocked"] is None
    stale = json.loads(hang.report_path(bases[1], 1).read_text())
    stale["time"] = time.time() - 60
    hang.report_path(bases[1], 1).write_text(json.dumps(stale))
    assert set(reps[0].collect()) == {0}
    for r in reps:
        r.close()


def test_the_mismatch_knob_makes_a_schedule_that_deadlocks():
    for name, m in (("naive", 1), ("gpipe", 2), ("1f1b", 4)):
        sched = S.build(name, 2, m)
        bad = [debug_knobs.mismatch(sched[0]), sched[1]]
        assert sorted(map(repr, bad[0])) == sorted(map(repr, sched[0]))  # same actions
        simulate.check(sched)
        with pytest.raises(simulate.ScheduleError):
            simulate.check(bad)
    with pytest.raises(config.ConfigError, match="debug.mismatch_rank=1: this rank's schedule"):
        config.load(["debug.mismatch_rank=1"], world_size=2)


def test_the_step_knobs_wrap_the_executor_from_outside():
    """debug.fail_*, stall_* and mismatch_* act in front of the executor's run_step, on their
    rank and step only; with none of them on this rank the executor runs unwrapped."""
    class Executor:
        actions = S.build("naive", 2, 1)[0]

        def run_step(self, step, actions=None):
            self.ran = (step, actions)
            return {}
    ex = Executor()
    off = config.load([], world_size=2).debug
    assert debug_knobs.wrap(ex, off, 0) is ex
    d = config.load(["debug.fail_rank=1", "debug.fail_step=2", "debug.mismatch_rank=0",
                     "debug.mismatch_step=1"], world_size=2).debug
    assert debug_knobs.wrap(ex, d, 1).run_step(1) == {} and ex.ran == (1, None)
    with pytest.raises(RuntimeError, match="injected failure on rank 1 at step 2"):
        debug_knobs.wrap(ex, d, 1).run_step(2)
    knobbed = debug_knobs.wrap(ex, d, 0)
    knobbed.run_step(0)
    assert ex.ran == (0, None)
    knobbed.run_step(1)
    assert ex.ran == (1, debug_knobs.mismatch(Executor.actions))


def test_kineto_steps_are_parsed_as_text():
    cfg = config.load(["trace.kineto=1:2"], world_size=1)      # YAML would read 1:2 as 62
    assert cfg.trace.kineto == "1:2" and config.parse_steps(cfg.trace.kineto) == (1, 2)
    for bad in ("3:1", "x", "2"):
        with pytest.raises(config.ConfigError, match="trace.kineto"):
            config.load([f"trace.kineto={bad}"], world_size=1)
    with pytest.raises(config.ConfigError, match="debug.no_shared_fs"):
        config.load(["debug.no_shared_fs=true"], world_size=1)


def test_profiler_range_names_follow_torch_pipelining():
    lab = {k: ranges.name(1, k, 2) for k in ("fwd", "bwd", "send_act", "recv_grad",
                                             "wait_recv_act", "bwd_w")}
    assert lab == {"fwd": "PP:1F2", "bwd": "PP:1B2", "send_act": "PP:1SEND_F2",
                   "recv_grad": "PP:1RECV_B2", "wait_recv_act": "PP:1WAIT_RECV_F2",
                   "bwd_w": "PP:1W2"}
    assert ranges.name(0, "opt", -1) == "PP:0OPT"
    # the range really reaches torch.profiler
    import torch
    from torch.profiler import ProfilerActivity, profile
    rng = ranges.labeler(0, torch.device("cpu"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with rng(S.Action(S.FWD, 3)):
            torch.ones(4).sum()
    assert "PP:0F3" in {e.key for e in prof.key_averages()}


def test_transfer_checks_size_and_checksum(tmp_path):
    base, run = tmp_path / "local", tmp_path / "run"
    (base / "trace").mkdir(parents=True)
    (base / "ranks").mkdir()
    data = os.urandom(5000)
    (base / "trace" / "events.r1.csv").write_bytes(data)
    (base / "ranks" / "rank1.log").write_text("hi\n")
    (base / "ranks" / ".reserve.r1").write_bytes(b"\0")
    (base / "ranks" / "blocked.r1.json").write_text("{}")
    (base / "trace" / "events.r0.csv").write_text("another rank's")
    assert localdir.own_files(base, 1) == ["ranks/rank1.log", "trace/events.r1.csv"]
    n, sha = localdir.digest(base / "trace" / "events.r1.csv")
    good = [data[:4096], data[4096:]]
    assert localdir.receive_file(run, "trace/events.r1.csv", n, sha, iter(good)) is None
    assert (run / "trace" / "events.r1.csv").read_bytes() == data
    flipped = [data[:100] + bytes([data[100] ^ 1]) + data[101:]]
    p = localdir.receive_file(run, "trace/x.r1.csv", n, sha, iter(flipped))
    assert p.startswith("trace/x.r1.csv: arrived with 5000 bytes, sha256 ")
    short = localdir.receive_file(run, "trace/y.r1.csv", n, sha, iter([data[:10]]))
    assert "arrived with 10 bytes" in short
    assert not (run / "trace" / "x.r1.csv").exists() and not list(run.rglob("*.tmp"))


class _Pipe:
    """Two ranks' ends of harness.core.comm's transfer calls, in one process (rank 1 goes first)."""
    def __init__(self):
        self.q = []

    def send_obj(self, obj, dst):
        self.q.append(obj)

    def recv_obj(self, src):
        return self.q.pop(0)

    def send_bytes(self, b, dst):
        self.q.append(b)

    def recv_bytes(self, src, n):
        b = self.q.pop(0)
        assert len(b) == n
        return b


def test_gather_moves_and_tidies(tmp_path, monkeypatch):
    monkeypatch.setattr(localdir, "CHUNK", 1000)
    b1, run = tmp_path / "l1" / "run", tmp_path / "run"
    (b1 / "trace").mkdir(parents=True)
    payload = os.urandom(2500)
    (b1 / "trace" / "events.r1.csv").write_bytes(payload)
    # rank 1's side: manifest and chunks go out, rank 0's acknowledgement comes back
    sent = _Pipe()
    sent.recv_obj = lambda src: ["trace/events.r1.csv"]
    kept = localdir.gather(b1, None, 1, 2, sent)
    assert kept == [] and not b1.exists()               # deleted after the acknowledgement
    rank0 = _Pipe()
    rank0.q = list(sent.q)
    assert localdir.gather(run, run, 0, 2, rank0) == []
    assert (run / "trace" / "events.r1.csv").read_bytes() == payload
    assert rank0.q == [["trace/events.r1.csv"]]         # the acknowledgement it sent back


def test_kineto_events_land_on_the_aligned_clock(tmp_path):
    from analysis.chrome import append_events
    from analysis.read import kineto
    from harness.runformat import kineto_file
    # Kineto's clock runs 1e9 ns ahead of the rank's; rank 1's clock is 5 ms behind rank 0's
    evs = [{"ph": "X", "cat": "user_annotation", "name": f"harness:clock:{t}", "ts": (t + 1e9) / 1e3,
            "dur": 1, "pid": 7, "tid": 7} for t in (10_000_000, 50_000_000)]
    evs += [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": (20_000_000 + 1e9) / 1e3,
             "dur": 3.5, "pid": 7, "tid": 7},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": (21_000_000 + 1e9) / 1e3,
             "dur": 2.0, "pid": 0, "tid": 9}]
    (tmp_path / "trace").mkdir()
    (tmp_path / kineto_file(1)).write_text(json.dumps({"traceEvents": evs}))

    class R:
        path, world_size, origin_ns = tmp_path, 2, 1_000_000
        meta = {"clock": {"estimates": [{"rank": 1, "phase": "start", "t_local": 0,
                                          "offset_ns": 5_000_000, "rtt_ns": 10}]}}
    out = kineto.events(R)
    xs = {e["name"]: e for e in out if e["ph"] == "X"}
    assert set(xs) == {"aten::mm", "gemm"}                  # anchors left out
    assert xs["aten::mm"]["ts"] == pytest.approx((20_000_000 + 5_000_000 - 1_000_000) / 1e3)
    assert xs["aten::mm"]["pid"] == 1 and xs["aten::mm"]["tid"] == 100
    assert xs["gemm"]["tid"] == 200 and xs["gemm"]["dur"] == 2.0
    # appended to a trace.json written by analysis.chrome: still one valid JSON document
    from analysis.chrome import write_chrome
    empty_ev = pd.DataFrame({c: pd.Series(dtype=t) for c, t in (
        ("rank", int), ("step", int), ("mb", int), ("layer", int), ("kind", object),
        ("lane", object), ("start", float), ("end", float), ("tb", float), ("peer", int),
        ("tag", int), ("bytes", int), ("pair", object))})
    path = tmp_path / "trace.json"
    with open(path, "w") as f:
        write_chrome(f, empty_ev, pd.DataFrame({"rank": [], "stored": [], "freed": [],
                                                "bytes": []}),
                     pd.DataFrame({"rank": [], "time": [], "source": [], "bytes": []}))
    before = json.loads(path.read_text())
    assert append_events(path, [json.dumps(e) for e in out]) == len(out)
    after = json.loads(path.read_text())
    assert len(after["traceEvents"]) == len(before["traceEvents"]) + len(out)
    assert after["displayTimeUnit"] == before["displayTimeUnit"]


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    import torch

    from benchmarks import gpu_check
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run python -m benchmarks.gpu_check itself")
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "**No CUDA here**" in text and "| 1-6 GPU checks | SKIP | no CUDA |" in text
    # its interval arithmetic, used on the GPU for kernels inside spans
    assert gpu_check.inside_share([(0, 10), (5, 20), (30, 40)], [(15, 35), (50, 60)]) == \
        pytest.approx(10 / 30)
