"""Sweeps without MPI: expansion, stable ids, resume, failures and the index (fake launchers)."""
import json
import subprocess

import pandas as pd
import pytest

from experiments import sweep as sw

SPEC = {"sweep": {
    "name": "t", "base": "deep_mlp", "repeats": 2, "ranks": [2, 3],
    "grid": {"schedule": ["naive", "gpipe"], "pipeline.microbatches": [1, 2]},
    "fixed": {"model.layers": 6, "train.steps": 2},
    "constraints": [{"when": {"schedule": "gpipe"}, "require": {"pipeline.microbatches": [2]},
                     "reason": "m=1 is naive"}],
    "points": [{"tag": "lessons", "ranks": 2, "repeats": 1, "exp": "no_detach",
                "train.steps": 5}],
}}


def spec(**kw):
    s = json.loads(json.dumps(SPEC))
    s["sweep"].update(kw)
    return s


def test_expand_grid_fixed_points_and_constraints():
    pts = sw.expand(SPEC)
    assert len(pts) == 2 * 4 + 1                      # ranks x schedule x m, then the point
    assert [p.ranks for p in pts[:4]] == [2] * 4 and pts[4].ranks == 3
    first = pts[0].params
    assert first == {"model.layers": 6, "train.steps": 2, "schedule": "naive",
                     "pipeline.microbatches": 1}
    assert all(p.repeats == 2 and p.tag == "grid" and p.exp == "deep_mlp" for p in pts[:8])
    les = pts[-1]
    assert (les.exp, les.tag, les.repeats, les.params["train.steps"]) == \
        ("no_detach", "lessons", 1, 5)                # a point's value wins over fixed
    skipped = {(p.ranks, p.params["schedule"], p.params["pipeline.microbatches"]): p.skip
               for p in pts[:8]}
    assert skipped[(2, "gpipe", 1)] == skipped[(3, "gpipe", 1)] == "m=1 is naive"
    assert skipped[(2, "gpipe", 2)] is None
    assert les.args()[0] == "exp=no_detach" and "train.steps=5" in les.args()


def test_invalid_combination_is_skipped_with_the_harness_reason():
    pts = {(p.ranks, p.params.get("schedule"), p.params.get("pipeline.microbatches")): sw.check(p)
           for p in sw.expand(SPEC)}
    naive2 = pts[(2, "naive", 2)]
    assert naive2.skip.startswith("invalid: pipeline.microbatches=2")
    assert pts[(2, "naive", 1)].skip is None and pts[(2, "gpipe", 2)].skip is None


def test_ids_are_stable_unique_and_follow_parameters():
    a = {p.id for p in sw.expand(SPEC)}
    assert len(a) == len(sw.expand(SPEC))
    grown = spec(grid={"schedule": ["naive", "gpipe"], "pipeline.microbatches": [1, 2, 4]})
    assert a <= {p.id for p in sw.expand(grown)}       # growing the sweep keeps old ids
    changed = spec(fixed={"model.layers": 6, "train.steps": 3})
    assert not (a - {sw.expand(SPEC)[-1].id}) & {p.id for p in sw.expand(changed)}
    assert sw.expand(SPEC)[0].id.startswith("p2-naive-m1-")
    with pytest.raises(ValueError, match="twice"):
        sw.expand(spec(points=[{"ranks": 2, "schedule": "naive"}] * 2))
    with pytest.raises(ValueError, match="run.dir"):
        sw.expand(spec(fixed={"run.dir": "x"}))


class Fake:
    """A launcher that writes what the harness would: meta.json with a status."""

    def __init__(self, fail=(), out=None):
        self.calls, self.fail, self.out, self.seen = [], set(fail), out, []

    def __call__(self, ranks, args, run_dir, timeout):
        self.calls.append(run_dir.name)
        if self.out is not None:   # the index on disk, as it is while this job runs
            self.seen.append(pd.read_csv(self.out / "sweep.csv"))
        run_dir.mkdir(parents=True)
        bad = any(f in run_dir.name for f in self.fail)
        (run_dir / "meta.json").write_text(json.dumps({"status": "failed" if bad else "complete"}))
        if bad:
            raise RuntimeError("mpirun ... failed (exit 1):\nTraceback ...\nRuntimeError: boom\n"
                               "application called MPI_Abort(MPI_COMM_WORLD, 1)")
        return run_dir


def quiet(*a, **k):
    pass


def test_resume_skips_complete_runs_without_launching(tmp_path):
    s = spec(ranks=[2], points=[])
    f = Fake(out=tmp_path)
    idx = sw.run_sweep(s, tmp_path, launcher=f, ncores=2, log=quiet)
    runnable = idx[idx["status"] != "skipped"]
    assert len(f.calls) == len(runnable) == 2 * 2    # naive m1, gpipe m2 (naive m2 invalid)
    assert (runnable["status"] == "complete").all()
    # the index on disk is rewritten after every run: at run k, runs < k are complete
    assert all((seen["status"] == "complete").sum() == k for k, seen in enumerate(f.seen))
    marker = tmp_path / runnable["run_dir"].iloc[0] / "keep"
    marker.write_text("x")
    again = Fake()
    idx2 = sw.run_sweep(s, tmp_path, launcher=again, ncores=2, log=quiet)
    assert again.calls == [] and marker.exists()
    pd.testing.assert_frame_equal(idx2, idx)
    grown = spec(ranks=[2, 3], points=[])             # the sweep grows: only new points run
    g = Fake()
    sw.run_sweep(grown, tmp_path, launcher=g, ncores=2, log=quiet)
    assert sorted(g.calls) == sorted(f"{p.id}-r{k}" for p in map(sw.check, sw.expand(grown))
                                     if p.ranks == 3 and not p.skip for k in range(2))


def test_failed_point_is_recorded_and_retried_alone(tmp_path):
    s = spec(ranks=[2], points=[])
    bad = next(p.id for p in sw.expand(s) if p.params["schedule"] == "gpipe"
               and p.params["pipeline.microbatches"] == 2)
    f = Fake(fail=[f"{bad}-r1"])
    idx = sw.run_sweep(s, tmp_path, launcher=f, ncores=2, log=quiet)
    assert len(f.calls) == 4                          # the sweep went on after the failure
    on_disk = pd.read_csv(tmp_path / "sweep.csv")
    row = on_disk[(on_disk["point"] == bad) & (on_disk["repeat"] == 1)].iloc[0]
    assert row["status"] == "failed" and row["message"] == "RuntimeError: boom"
    ok = on_disk[on_disk["status"] != "skipped"].drop(row.name)
    assert (ok["status"] == "complete").all() and len(on_disk) == len(idx)
    assert (tmp_path / row["run_dir"]).exists()        # the failed run's directory is kept
    retry = Fake()
    idx2 = sw.run_sweep(s, tmp_path, launcher=retry, ncores=2, log=quiet)
    assert retry.calls == [f"{bad}-r1"]
    assert (tmp_path / "runs" / f"{bad}-r1-failed-1" / "meta.json").exists()
    assert (idx2.loc[idx2["status"] != "skipped", "status"] == "complete").all()


def test_timeout_and_oversubscription_are_in_the_index(tmp_path):
    def slow(ranks, args, run_dir, timeout):
        raise subprocess.TimeoutExpired("mpirun", timeout)
    idx = sw.run_sweep(spec(points=[], timeout_s=7), tmp_path, launcher=slow, ncores=2, log=quiet)
    run = idx[idx["status"] != "skipped"]
    assert (run["status"] == "failed").all() and (run["message"] == "timed out after 7 s").all()
    assert (idx["oversubscribed"] == (idx["ranks"] > 2)).all() and idx["oversubscribed"].any()
    assert (idx["cores"] == 2).all()
    csv = pd.read_csv(tmp_path / "sweep.csv")
    assert csv["oversubscribed"].tolist() == idx["oversubscribed"].tolist()
    skipped = csv[csv["status"] == "skipped"]
    assert skipped["run_dir"].isna().all() and skipped["message"].str.len().gt(0).all()


def test_another_sweep_is_refused(tmp_path):
    sw.run_sweep(spec(ranks=[2], points=[]), tmp_path, launcher=Fake(), ncores=2, log=quiet)
    with pytest.raises(SystemExit, match="holds sweep 't'"):
        sw.run_sweep(spec(name="other"), tmp_path, launcher=Fake(), ncores=2, log=quiet)


def test_error_line_prefers_the_error():
    assert sw.error_line("a\nValueError: x\nsome noise\n") == "ValueError: x"
    assert sw.error_line("just text\nlast") == "last"
    assert sw.error_line("") == "(no message)"


def test_paper_sweeps_expand(tmp_path):
    """The shipped sweep files parse, expand and leave runnable points."""
    from pathlib import Path
    for name in ("paper.yaml", "paper_quick.yaml"):
        pts = [sw.check(p) for p in sw.expand(sw.load_spec(Path(sw.__file__).parent / name))]
        assert {p.tag for p in pts} >= {"grid", "overlap", "lessons"}
        assert sum(p.repeats for p in pts if not p.skip) >= 7


def test_an_invalid_explicit_point_is_invalid_not_skipped_and_fails_the_sweep(tmp_path, monkeypatch):
    s = spec(ranks=[2], points=[{"tag": "mine", "ranks": 2, "schedule": "naive",
                                 "pipeline.microbatches": 4}])
    idx = sw.run_sweep(s, tmp_path, launcher=Fake(), ncores=2, log=quiet)
    mine = idx[idx["tag"] == "mine"].iloc[0]
    assert mine["status"] == "invalid" and mine["message"].startswith("invalid: pipeline.micro")
    grid = idx[idx["tag"] == "grid"]
    assert set(grid["status"]) == {"complete", "skipped"}     # grid combinations stay skips
    f = tmp_path / "s.yaml"
    f.write_text(json.dumps(s))
    monkeypatch.setattr(sw, "run_sweep", lambda spec, out: sw.frame(idx.to_dict("records")))
    assert sw.main([str(f), "--out", str(tmp_path)]) == 1


def test_a_broken_sweep_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("sweep:\n  grid: {a: [1, 2}\n")
    assert sw.main([str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s.yaml:2:" in err and "YAML syntax error" in err


def _running_meta(run_dir, pid, start):
    import socket
    run_dir.mkdir(parents=True)
    (run_dir / "ranks").mkdir()
    (run_dir / "meta.json").write_text(json.dumps({"status": "running", "ranks": [
        {"rank": 0, "host": socket.gethostname(), "pid": pid}]}))
    (run_dir / "ranks" / "heartbeat.r0.json").write_text(json.dumps(
        {"rank": 0, "host": socket.gethostname(), "pid": pid, "pid_start": start, "step": 3,
         "time": 0.0, "step_time": 0.1, "timeout_s": 120}))


def test_a_live_run_is_never_moved_aside_nor_run_twice_and_a_dead_one_is_retried(tmp_path):
    import os

    import psutil
    s = spec(ranks=[2], points=[], repeats=1)
    pts = [p for p in map(sw.check, sw.expand(s)) if not p.skip]
    me = psutil.Process()
    live, dead = tmp_path / "runs" / f"{pts[0].id}-r0", tmp_path / "runs" / f"{pts[1].id}-r0"
    _running_meta(live, os.getpid(), me.create_time())          # this very process: alive
    _running_meta(dead, os.getpid(), me.create_time() - 1000)   # same pid, another process
    assert sw.status_of(live) == "running" and sw.status_of(dead) == "died"
    f = Fake()
    idx = sw.run_sweep(s, tmp_path, launcher=f, ncores=2, log=quiet)
    assert f.calls == [dead.name]
    assert (live / "meta.json").exists() and (tmp_path / "runs" / f"{dead.name}-failed-1").exists()
    row = idx[idx["run_dir"] == f"runs/{live.name}"].iloc[0]
    assert row["status"] == "running" and "alive" in row["message"]


def test_one_runner_per_sweep_directory(tmp_path):
    with sw.exclusive(tmp_path):
        with pytest.raises(SystemExit, match="being run by another sweep runner"):
            sw.run_sweep(spec(ranks=[2], points=[]), tmp_path, launcher=Fake(), ncores=2,
                         log=quiet)
    sw.run_sweep(spec(ranks=[2], points=[]), tmp_path, launcher=Fake(), ncores=2, log=quiet)
