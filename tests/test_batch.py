"""harness.batch: several runs in one job, each exactly as harness.run runs it (the converted
test modules compare batched runs with one-process references bit for bit or to 1e-5; here:
what a bad batch file and a failing run in a batch do)."""
import gc
import json
import subprocess
import sys

import pytest

from harness import batch
from harness.ops.launch import mpirun
from harness.run import freeze_for_exit
from helpers import REPO, SMALL, losses, meta, ok, run_harness


@pytest.mark.parametrize("text, says", [("not json", "not JSON"), ("[]", "non-empty JSON list"),
                                        ('[["a=1"], "b=2"]', "lists of 'key=value' strings"),
                                        ('[["a=1", 2]]', "lists of 'key=value' strings")])
def test_a_bad_batch_file_is_one_line_and_exit_2(tmp_path, capsys, text, says):
    f = tmp_path / "b.json"
    f.write_text(text)
    assert batch.main([str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"harness.batch: error: {f}: ") and says in err[0]


def test_the_exit_leaves_what_is_left_out_of_the_collectors_reach():
    # harness.run and harness.batch exit through it: the interpreter's last collections then
    # skip the frozen objects (the time it saves is measured in docs/results.md)
    keep = [[] for _ in range(100)]            # objects the collector tracks
    gc.unfreeze()
    try:
        assert freeze_for_exit(3) == 3
        assert gc.get_freeze_count() > len(keep)
        assert not any(o is keep for o in gc.get_objects())    # no generation holds it
    finally:
        gc.unfreeze()


def test_a_missing_batch_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert batch.main([str(tmp_path / "none.json")]) == 2
    assert "harness.batch: error:" in capsys.readouterr().err


def test_runs_go_in_order_and_the_first_failure_ends_the_batch(tmp_path):
    """Two good runs, a config error, a good run: the first two complete and equal the same
    config run alone; the third is refused in one line (exit 2); the fourth never starts."""
    args = [*SMALL, "train.steps=2"]
    runs = [[*args, f"run.dir={tmp_path / 'a'}"], [*args, "schedule=1f1b",
                                                     "pipeline.microbatches=2",
                                                     f"run.dir={tmp_path / 'b'}"],
            [*args, "train.stepz=3", f"run.dir={tmp_path / 'c'}"],
            [*args, f"run.dir={tmp_path / 'd'}"]]
    spec = tmp_path / "batch.json"
    spec.write_text(json.dumps(runs))
    proc = subprocess.run([mpirun(), "-n", "2", sys.executable, "-m", "harness.batch", str(spec)],
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert proc.stderr.count("train.stepz") == 1, proc.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    assert meta(tmp_path / "a")["status"] == meta(tmp_path / "b")["status"] == "complete"
    alone = ok(run_harness(2, *args, "schedule=1f1b", "pipeline.microbatches=2",
                           f"run.dir={tmp_path / 'alone'}"))
    assert losses(tmp_path / "b") == losses(alone)


DRIVER = """
import gc, json, sys, weakref
from harness import batch, worker
refs, walked, start = [], [], worker.Worker.start
def probe(self):
    refs.append(weakref.ref(self))
    gc.collect()
    walked.append(len(gc.get_objects()))    # what the run's own collection walks
    start(self)
worker.Worker.start = probe
rc = batch.main([sys.argv[1]])
gc.collect()                                # frozen objects are not collected
print(json.dumps({"rc": rc, "alive": sum(r() is not None for r in refs), "walked": walked,
                  "frozen": gc.get_freeze_count()}))
"""


def test_a_batch_freezes_its_imports_and_frees_every_runs_model(tmp_path):
    """The imports are frozen between runs, out of each run's collection, and every run's
    worker (and the model it holds in cycles) is collected after it, not frozen with them."""
    runs = [[*SMALL, "train.steps=2", f"run.dir={tmp_path / name}"] for name in "abc"]
    spec = tmp_path / "batch.json"
    spec.write_text(json.dumps(runs))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(spec)], capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["rc"] == 0 and len(got["walked"]) == 3, proc.stderr
    assert got["alive"] == 0
    # the runs after the first collect ~10^3 objects of their own; the frozen imports ~10^5
    assert all(10 * w < got["frozen"] for w in got["walked"][1:]), got
