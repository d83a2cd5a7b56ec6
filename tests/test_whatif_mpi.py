"""analysis.whatif end to end on a real 2-rank run (mpirun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO, SMALL, Batches, declare_runs, meta

declare_runs(__name__, {"gpipe": (2, [*SMALL, "schedule=gpipe", "pipeline.microbatches=2",
                                      "train.steps=6"])})


def test_whatif_cli_on_a_real_run(tmp_path, capsys):
    d = Batches(__name__)["gpipe"]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def whatif(*args):
        """The command in this process (its start-up, torch's import, paid once: the first
        call below runs it as `python -m` does)."""
        from analysis.whatif import main
        capsys.readouterr()
        rc = main([str(d), *args, "--json", "--out", str(tmp_path / "out")])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)
    same = subprocess.run([sys.executable, "-m", "analysis.whatif", str(d), "--json", "--out",
                           str(tmp_path / "out")], check=False, capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert same.returncode == 0, same.stderr
    res = json.loads(next((tmp_path / "out").glob("whatif-same.json")).read_text())
    # the run's own configuration: peak activations exactly what the run measured, and the
    # step (its steady steps' median costs replayed) of the measured steps' size. How close is
    # the benchmark's to measure on a quiet host (benchmarks.whatif_accuracy): here the ranks
    # may share the cores with other tests, and every measured step then holds waits that no
    # replay of median costs has, so only the order of magnitude is the code's to assert.
    assert res["predicted"]["peak_act_bytes"] == [int(x) for x in res["measured"]["peak_act_bytes"]]
    assert res["predicted"]["step_s"] > 0 and 0 <= res["predicted"]["bubble"] < 1
    spans = _steady_spans(d)
    assert min(spans) / 2 <= res["predicted"]["step_s"] <= 2 * max(spans), (spans, res["predicted"])
    assert res["assumed"] == [], res["assumed"]
    other = whatif("schedule=1f1b", "m=4", "--scale", "rank=0,kind=bwd,factor=1.5")
    assert other.returncode == 0, other.stderr
    pred = json.loads(other.stdout.strip().splitlines()[-2])
    assert pred["schedule"] == "1f1b" and pred["microbatches"] == 4
    # 1F1B holds min(m, p - s) microbatches of half the rows: stage 0 two, stage 1 one
    per_mb = [b / 2 for b in res["predicted"]["peak_act_bytes"]]   # gpipe m=2 holds 2 of 16 rows
    assert abs(pred["peak_act_bytes"][0] - 2 * per_mb[0] / 2) <= 8
    assert list((tmp_path / "out").glob("whatif-schedule=1f1b-m=4-*.png"))
    bad = whatif("m=5")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    # another microbatch count from this one run: compute scaled by the set-up block times
    # (meta.json ranks[r].block_times), nothing assumed about it
    m8 = whatif("m=8")
    assert m8.returncode == 0, m8.stderr
    assert "proportional to rows" not in m8.stdout and "assumed" in m8.stdout
    # timed once per block and size, as the tests' runs ask (trace.block_repeats=1)
    assert [r["block_times"]["repeats"] for r in meta(d)["ranks"]] == [1, 1]


def _steady_spans(d) -> list:
    """The run's steady steps' spans (s), as analysis.metrics measures them."""
    from analysis import load_run, metrics
    run = load_run(d)
    s = metrics.summarize(run.events, run.pebbles, run.memory, run.meta, run.steps)
    return [r["span"] for r in s["per_step"] if r["step"] in s["steps"]["steady"]]
