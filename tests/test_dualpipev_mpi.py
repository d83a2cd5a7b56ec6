"""DualPipeV under mpirun (schedule=dualpipev, two chunks per rank in a V, full and split
backwards in one step): losses and final weights match the single-process run to 1e-5 on the MLP
and the GPT, peak pebbles per rank equal the walked in-flight bytes exactly, and each split
microbatch's activations live until its W. The checks are test_zb_mpi.py's."""
import pytest
from test_zb_mpi import GPT, MLP, _matches, _peak_pebbles_equal_theory, _w_keeps_activations_past_b

from analysis import load_run
from helpers import Batches, declare_runs, run_harness

DUALPIPEV = ["schedule=dualpipev", "pipeline.virtual=2"]
CASES = [("mlp", 2, 4), ("mlp", 2, 8), ("mlp", 3, 6), ("mlp", 4, 8), ("gpt", 2, 4)]


IDS = [f"{a}-p{p}-m{m}" for a, p, m in CASES]


# the references and every case
declare_runs(__name__, {"mlp": (None, MLP), "gpt": (None, GPT), **{
    name: (p, [*(MLP if model == "mlp" else GPT), *DUALPIPEV, f"pipeline.microbatches={m}"])
    for name, (model, p, m) in zip(IDS, CASES)}})


@pytest.fixture(scope="module")
def runs():
    return Batches(__name__)


@pytest.mark.parametrize("model, p, m", CASES, ids=IDS)
def test_dualpipev_matches_single_process(runs, model, p, m):
    d = runs[f"{model}-p{p}-m{m}"]
    ref = runs[model]
    _matches(ref, d, p)
    _peak_pebbles_equal_theory(d, p)
    assert {"bwd", "bwd_in", "bwd_w"} <= set(load_run(d).events["kind"])
    _w_keeps_activations_past_b(d, p)


def test_too_few_microbatches_are_refused(tmp_path):
    proc = run_harness(2, *MLP, *DUALPIPEV, "pipeline.microbatches=2", f"run.dir={tmp_path / 'x'}")
    assert proc.returncode == 2 and "needs at least 2p = 4 microbatches" in proc.stderr, \
        proc.stderr
