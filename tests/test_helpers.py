"""The tests' own machinery: helpers.Batches makes every module's declared runs of one world size
in one job (with run_batch stubbed: which runs go into which job, and where each one lands)."""
from pathlib import Path

import helpers


def test_each_world_size_is_one_job_for_the_modules_that_run(monkeypatch, tmp_path):
    jobs = []

    def fake_run_batch(n, runs, base):
        jobs.append((n, list(runs)))
        return {name: base / name for name in runs}
    monkeypatch.setattr(helpers, "run_batch", fake_run_batch)
    monkeypatch.setattr(helpers, "_DECLARED", {})
    monkeypatch.setattr(helpers, "_DIRS", {})
    monkeypatch.setattr(helpers, "SESSION", {"base": tmp_path, "modules": {"a", "b"}})
    helpers.declare_runs("a", {"x": (2, ["k=1"]), "ref": (None, ["k=0"]), 3: (3, [])})
    helpers.declare_runs("b", {"x": (2, ["k=2"])})
    helpers.declare_runs("c", {"x": (2, ["k=3"])})          # deselected: never run
    view = helpers.Batches      # (so named, conftest's scan would mark this test as launching)
    a, b = view("a"), view("b")
    assert b["x"] == tmp_path / "n2-0" / "b.x"                    # the job of world size 2 ...
    assert jobs == [(2, ["a.x", "b.x"])]                          # ... holds a's run too
    assert a["x"] == tmp_path / "n2-0" / "a.x" and len(jobs) == 1     # made already
    assert a[3] == tmp_path / "n3-2" / "a.3"                      # a name need not be a string
    assert a["ref"].parent == tmp_path / "n1-3"                   # None: one process
    assert [n for n, _ in jobs] == [2, 3, None]
    # a module that is not among the session's (run on its own) still gets its runs
    assert view("c")["x"].name == "c.x" and jobs[-1] == (2, ["c.x"])


def test_the_batch_folder_is_the_sessions():
    assert isinstance(helpers.SESSION["base"], Path) and helpers.SESSION["base"].is_dir()
