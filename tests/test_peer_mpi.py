"""The peer comparison of benchmarks.schedules, checked: benchmarks/torch_pipe.py (PyTorch's own
schedule classes, torch.distributed.pipelining under torchrun, gloo, built on our chunks by
harness.torchpipe.build) computes the same losses as our run of the same schedule. That every
class does is tested on the recorded runtime (tests/test_torchpipe_mpi.py, which builds the
classes the same way): here one schedule of each kind checks the benchmark's own path, whose
agreement to 1e-5 is what makes its step-time ratio a comparison of the same work."""
import pytest

from analysis import load_run, metrics
from benchmarks.schedules import VIRTUAL, torch_run, usable
from helpers import Batches, declare_runs

SMALL = ["model.layers=8", "model.width=64", "model.in_features=32", "data.batch_size=32",
         "threads=1"]
CASES = [("gpipe", 2), ("zbv", 4)]   # a plain schedule; a V with split backward


def _args(name):
    return [*SMALL, *VIRTUAL.get(name, [])]


# our side of every case, as benchmarks.schedules.ours launches it
declare_runs(__name__, {name: (2, [f"schedule={name}", f"pipeline.microbatches={m}",
                                   "train.steps=3", *_args(name), "quiet=true"])
                        for name, m in CASES})


@pytest.fixture(scope="module")
def runs():
    return Batches(__name__)


@pytest.mark.parametrize("name, m", CASES, ids=[f"{n}-m{m}" for n, m in CASES])
def test_pytorch_computes_our_losses(runs, tmp_path, name, m):
    assert usable(name, 2, m)
    run = load_run(runs[name])
    bubble = metrics.summarize(run.events, run.pebbles, run.memory, run.meta,
                               run.steps)["pipeline"]["bubble_measured"]
    mine = run.stats.dropna(subset=["loss"]).sort_values("step")["loss"].tolist()
    theirs = torch_run(2, name, m, 3, _args(name), tmp_path / "torch.json")
    assert len(mine) == len(theirs["losses"]) == 3
    assert theirs["losses"] == pytest.approx(mine, rel=1e-5)
    assert len(theirs["step_times"]) == 3 and min(theirs["step_times"]) > 0
    assert 0 < bubble < 1


def test_usable_cases_follow_each_schedules_requirements():
    assert not usable("interleaved", 2, 3) and usable("interleaved", 2, 4)
    assert not usable("dualpipev", 2, 3) and usable("dualpipev", 2, 4)
    assert not usable("1f1b", 2, 1) and usable("gpipe", 2, 1)
