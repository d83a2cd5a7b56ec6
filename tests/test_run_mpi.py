"""The runnable core, end to end: real `mpirun -n P python -m harness.run` on CPU."""
import csv
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from helpers import REPO, SMALL, Batches, declare_runs, losses, meta, ok, run_harness, weights

STEPS = ["train.steps=4"]


WAITS = [("sleep", ["comm.poll_us=20"], {"wait": "sleep", "poll_us": 20.0, "spin_us": None}),
         ("backoff", ["comm.poll_us=100", "comm.spin_us=0"],
          {"wait": "backoff", "poll_us": 100.0, "spin_us": 0.0})]


def _todo():
    todo = {n: (None if n == 1 else n, [*SMALL, *STEPS, "run.save_weights=true"])
            for n in (1, 2, 3)}
    todo["untraced"] = (2, [*SMALL, *STEPS, "trace.enabled=false"])
    todo.update({f"wait-{w}": (2, [*SMALL, *STEPS, f"comm.wait={w}", *extra])
                 for w, extra, _ in WAITS})
    return todo


declare_runs(__name__, _todo())


@pytest.fixture(scope="module")
def batches():
    """This module's successful runs, made with the session's other runs."""
    return Batches(__name__)


@pytest.fixture(scope="module")
def runs(batches):
    """The same config on 1 (no mpirun), 2 and 3 ranks, with final weights saved."""
    return {n: batches[n] for n in (1, 2, 3)}




def test_pipelined_runs_reproduce_the_single_process_losses_exactly(runs):
    ref = losses(runs[1])
    assert len(ref) == 4
    assert ref[-1] < ref[0], "the loss should fall"
    for n in (2, 3):
        assert losses(runs[n]) == ref, f"P={n} differs from P=1"


def test_final_weights_of_every_stage_match_the_single_process_run(runs):
    ref = weights(runs[1], 1)
    assert sorted(ref) == list(range(6))
    for n in (2, 3):
        got = weights(runs[n], n)
        assert sorted(got) == sorted(ref)
        for layer, sd in ref.items():
            for k, v in sd.items():
                assert torch.equal(got[layer][k], v), f"P={n} layer {layer} {k}"


def test_run_directory_is_complete_and_described(runs):
    d = runs[3]
    m = meta(d)
    assert m["status"] == "complete" and m["end_time"] and m["start_time"]
    assert m["world_size"] == 3 and [r["rank"] for r in m["ranks"]] == [0, 1, 2]
    assert all(r["pid"] and r["host"] and r["device"] == "cpu" and r["threads"] == 1
               for r in m["ranks"])
    # the allocator policy each rank ran under (harness/ops/malloc.py; glibc on Linux)
    glibc = platform.libc_ver()[0] == "glibc"
    assert {r["malloc"] for r in m["ranks"]} == {"keep" if glibc else
                                                 "system (keep needs glibc; this C library is not)"}
    # the split covers all layers contiguously and is recorded
    assert m["split"][0][0] == 0 and m["split"][-1][1] == 6
    assert all(a[1] == b[0] for a, b in zip(m["split"], m["split"][1:]))
    assert m["versions"]["torch"] and m["versions"]["mpi4py"] and "MPICH" in m["mpi_library"]
    assert (d / "config.yaml").read_text().count("steps: 4") == 1
    with open(d / "stats.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), int(r["rank"])) for r in rows] == [(s, r) for s in range(4) for r in range(3)]
    for r in rows:  # loss only on the last stage; norms everywhere
        assert (r["loss"] != "") == (r["rank"] == "2")
        assert float(r["grad_norm"]) > 0 and float(r["update_norm"]) > 0


def test_meta_records_each_blocks_digest_and_why_the_mlp_is_not_compared(runs):
    """The MLP's ranks build only their own layers, so the digests (harness.models.digest) are
    recorded but cannot be compared across ranks; they are the same for any split."""
    ds = [meta(runs[n])["model"]["digests"] for n in (1, 2, 3)]
    assert ds[0] == ds[1] == ds[2]
    assert len(ds[0]["blocks"]) == 6 and all(len(b) == 16 for b in ds[0]["blocks"])
    assert ds[0]["compared"] is False and ds[0]["note"].startswith("not possible: ")


def test_a_run_never_overwrites_another(runs):
    before = (runs[2] / "meta.json").read_text()
    proc = run_harness(2, *SMALL, *STEPS, f"run.dir={runs[2]}")
    assert proc.returncode != 0
    assert "already exists" in proc.stderr and str(runs[2]) in proc.stderr
    assert (runs[2] / "meta.json").read_text() == before


def test_default_run_directory_is_named_by_experiment_and_time(tmp_path):
    d = ok(run_harness(2, *SMALL, "train.steps=1", cwd=tmp_path))
    assert d.parent == tmp_path / "results" or (tmp_path / d).parent == tmp_path / "results"
    assert d.name.startswith("deep_mlp-")


def test_progress_lines_then_the_run_directory_last(tmp_path):
    proc = run_harness(2, *[a for a in SMALL if a != "quiet=true"], "train.steps=3",
                       f"run.dir={tmp_path / 'r'}")
    lines = ok(proc) and proc.stdout.strip().splitlines()
    # steps are numbered from 0, as in stats.csv, the traces and the analysis
    assert [ln.split()[1:3] for ln in lines[:-1]] == [["0", "(1/3)"], ["1", "(2/3)"],
                                                      ["2", "(3/3)"]]
    assert all("loss" in ln and "ms" in ln for ln in lines[:-1])
    assert lines[-1] == str(tmp_path / "r")


def test_bad_input_fails_fast_on_every_rank_with_one_message(tmp_path):
    proc = run_harness(3, *SMALL, "train.stepz=2", f"run.dir={tmp_path / 'r'}", timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("unknown key 'train.stepz'") == 1, proc.stderr
    assert not (tmp_path / "r").exists(), "nothing is created for an invalid config"


def test_a_refused_config_is_said_before_torch_is_imported(tmp_path):
    # the verdict needs MPI and the config only: torch (~1 s a rank) is for runs that will go.
    # So is the torchrun path's, on each rank alone (torchrun's variables, as its agent sets
    # them): a bad key, and our runtime under torchrun
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "t"}
    for env, args, says in (({}, ["train.stepz=2"], "unknown key 'train.stepz'"),
                            (torchrun, ["runtime=torch", "train.stepz=2"],
                             "unknown key 'train.stepz'"),
                            (torchrun, ["runtime=ours"], "add runtime=torch")):
        argv = [*args, f"run.dir={tmp_path / 'r'}"]
        code = ("import sys; from harness import run; "
                f"rc = run.main({argv!r}); print(rc, 'torch' in sys.modules)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, cwd=REPO, env={**os.environ, **env})
        assert proc.stdout.split() == ["2", "False"], (args, proc.stderr)
        assert says in proc.stderr


def test_more_stages_than_layers_is_refused(tmp_path):
    proc = run_harness(3, *SMALL, "model.layers=2", f"run.dir={tmp_path / 'r'}", timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("more pipeline stages than model.layers=2") == 1


def test_an_exception_on_one_rank_brings_the_job_down_and_is_recorded(tmp_path):
    d = tmp_path / "r"
    proc = run_harness(3, *SMALL, "train.steps=50", "debug.fail_rank=1", "debug.fail_step=2",
                       f"run.dir={d}", timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr
    assert "injected failure on rank 1 at step 2" in proc.stderr
    m = meta(d)
    assert m["status"] == "failed"
    assert m["error"]["rank"] == 1 and m["error"]["type"] == "RuntimeError"
    assert not (d / "stats.csv").exists(), "no merged stats that would look complete"
    with open(d / "ranks" / "stats.r0.csv") as f:  # what completed is kept
        assert [r["step"] for r in csv.DictReader(f)] == ["0", "1"]


def test_a_receive_that_can_never_complete_times_out(tmp_path):
    d = tmp_path / "r"
    proc = run_harness(2, *SMALL, "train.steps=50", "debug.stall_rank=0", "debug.stall_step=1",
                       "comm.timeout_s=2", f"run.dir={d}", timeout=60)
    assert proc.returncode != 0
    m = meta(d)
    assert m["status"] == "failed" and m["error"]["type"] == "CommTimeout"
    assert "receive A1.0.0>1 from rank 0" in m["error"]["message"]
    assert "comm.timeout_s=2" in proc.stderr


def test_help_needs_no_mpi_and_lists_experiments():
    proc = run_harness(None, "--help", timeout=60)
    assert proc.returncode == 0
    assert "deep_mlp" in proc.stdout and "train.steps" in proc.stdout


def test_tracing_off_trains_identically(runs, batches):
    d = batches["untraced"]
    assert losses(d) == losses(runs[2])
    assert not (d / "trace").exists()
    assert json.loads((d / "meta.json").read_text())["trace"]["enabled"] is False


@pytest.mark.parametrize("wait, extra, recorded", WAITS)
def test_sleeping_waits_train_identically(runs, batches, wait, extra, recorded):
    """comm.wait=sleep|backoff (test-and-sleep instead of MPI's busy-polling waits) changes how
    a rank waits, not what it computes."""
    d = batches[f"wait-{wait}"]
    assert losses(d) == losses(runs[2])
    assert json.loads((d / "meta.json").read_text())["comm"] == recorded


def test_more_ranks_than_cores_is_warned_once(tmp_path):
    from harness.config import cores_available
    n = cores_available() + 1
    if n > 6:
        pytest.skip(f"{n} ranks would exceed the 6 layers of the small model")
    proc = run_harness(n, *SMALL, "train.steps=1", f"run.dir={tmp_path / 'r'}", timeout=120)
    ok(proc)
    assert proc.stderr.count("oversubscribed") == 1, proc.stderr
    assert f"{n} ranks on " in proc.stderr
