"""Issue 10/14 analyses on real `mpirun` runs: late-receiver sends in 1F1B, straggler blame
with a rank slowed by a known amount, the critical path of naive, and analysis.compare."""
import csv
import json
import subprocess
import sys

import pytest

from analysis import load_run, metrics as M
from analysis.pebble import main as pebble
from helpers import REPO, SMALL, Batches, declare_runs


BLAME = [("naive", 1, 2, 0), ("gpipe", 4, 2, 1), ("1f1b", 4, 2, 0)]
COMPARE = SMALL + ["schedule=gpipe", "pipeline.microbatches=4", "train.steps=4"]


def _blame_args(schedule, m):
    return SMALL + [f"schedule={schedule}", f"pipeline.microbatches={m}", "train.steps=8"]


def _todo():
    todo = {"1f1b-default": (2, ["schedule=1f1b", "pipeline.microbatches=4", "train.steps=4",
                                 "quiet=true"]),
            "naive": (2, [*SMALL, "train.steps=4"]),
            "compare-a": (2, COMPARE), "compare-b": (2, [*COMPARE, "pipeline.overlap=true"])}
    for schedule, m, n, slow in BLAME:
        # 10 ms: the added idle (~80 ms a step) stands well clear of what two runs on a shared
        # host differ by anyway (with 5 ms the test failed 2 times in 8 here: 86 % of 41 ms, once)
        todo[f"{schedule}-base"] = (n, _blame_args(schedule, m))
        todo[f"{schedule}-slow"] = (n, [*_blame_args(schedule, m), f"debug.slow_rank={slow}",
                                        "debug.slow_ms=10"])
    return todo


declare_runs(__name__, _todo())


@pytest.fixture(scope="module")
def runs():
    """Every run of this module (all on 2 ranks), made with the session's other runs."""
    return Batches(__name__)


def _summary(d):
    r = load_run(d)
    return M.summarize(r.events, r.pebbles, r.memory, r.meta, r.steps)


def _rank(s, r):
    return next(x for x in s["per_rank"] if x["rank"] == r)


def test_1f1b_rank0_send_time_is_mostly_late_receiver(runs):
    # the default 16 x 1024 model, m=4: 256 KiB boundary tensors go by rendezvous, and 1F1B's
    # stage 0 waits for its send (rank 1 posts the receive only after its backward) first
    d = runs["1f1b-default"]
    r0 = _rank(_summary(d), 0)
    assert r0["send_wait"] > 0.5 * (r0["send_wait"] + r0["send_transfer"])
    assert r0["send_wait"] > r0["recv_wait"]        # it waits in its sends, not its receives


# 2 ranks only: 3 ranks on 2 cores share cores, and a sleeping straggler frees one, so the
# others' idle can even fall (measured -8 ms in one run): "added idle" is not measurable there
@pytest.mark.parametrize("schedule, m, n, slow", BLAME)
def test_blame_puts_added_idle_on_the_slowed_rank(runs, schedule, m, n, slow):
    base = _summary(runs[f"{schedule}-base"])
    slowed = _summary(runs[f"{schedule}-slow"])
    others = [r for r in range(n) if r != slow]
    added = sum(_rank(slowed, r)["idle"] - _rank(base, r)["idle"] for r in others)
    blamed = _rank(slowed, slow)["caused_idle"] - _rank(base, slow)["caused_idle"]
    # 10 ms per block forward and backward: at least 3 blocks x 20 ms per microbatch added
    assert added > 0.020
    # at least 90 % of the added idle is put on the slowed rank (issue 14); the upper bound
    # only catches gross double counting (waits where consecutive step windows overlap)
    assert 0.9 * added <= blamed <= 1.5 * added
    assert slowed["blame"]["worst_offender"]["rank"] == slow


def test_naive_critical_path_runs_through_every_stage(runs):
    # 2 ranks: with 3 on 2 cores, spinning ranks keep their peer off the core and "transfers"
    # of 8 KiB take milliseconds, which the path then (rightly) runs through
    d = runs["naive"]
    cp = _summary(d)["critical_path"]
    got = {(x["rank"], x["what"]) for x in cp["per_rank_what"]}
    assert {(r, k) for r in range(2) for k in ("fwd", "bwd")} <= got
    # second way: per step the path's segments add up to the step's span (step_windows)
    from analysis.measure.critical import critical_path
    run = load_run(d)
    path = critical_path(run.events, run.steps)
    got = (path["end"] - path["start"]).groupby(path["step"]).sum()
    win = M.step_windows(run.events[run.events["lane"] != "step"])["span"]
    assert got.to_numpy() == pytest.approx(win.loc[got.index].to_numpy(), rel=1e-9)


def test_compare_two_real_runs(runs, tmp_path):
    a, b = runs["compare-a"], runs["compare-b"]
    out = tmp_path / "cmp"
    p = subprocess.run([sys.executable, "-m", "analysis.compare", str(a), str(b), "--out",
                        str(out)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "idle" in p.stdout and "B-A" in p.stdout
    rows = list(csv.DictReader(open(out / "compare.csv")))
    # second way: each run's own metrics.json from analysis.pebble (in this process: the
    # command's own start-up is compare's above)
    for run, col in ((a, "a"), (b, "b")):
        assert pebble([str(run), "-q", "--no-trace", "--format", "none", "--out",
                       str(tmp_path / col)]) == 0
        per = {x["rank"]: x for x in json.loads((tmp_path / col / "metrics.json")
                                                .read_text())["per_rank"]}
        for row in rows:
            want = per[int(row["rank"])][row["metric"]]
            if want is not None:
                assert float(row[col]) == pytest.approx(want)
    for row in rows:
        if row["diff"]:
            assert float(row["diff"]) == pytest.approx(float(row["b"]) - float(row["a"]))
    import matplotlib.pyplot as plt
    img = plt.imread(out / "compare.png")
    assert img.shape[1] > 1000 and img[..., :3].std() > 0.05
