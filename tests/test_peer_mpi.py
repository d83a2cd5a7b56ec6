"""The peer comparison of benchmarks.schedules, checked: PyTorch's own schedule classes
(torch.distributed.pipelining under torchrun, gloo), built on our chunks by
benchmarks/torch_pipe.py, compute the same losses as our runs of the same schedule, for every
schedule with a PyTorch counterpart. A second implementation of each schedule agreeing with ours
to 1e-5 is what makes the step-time ratio a comparison of the same work."""
import pytest

from benchmarks.schedules import VIRTUAL, ours, torch_run, usable

SMALL = ["model.layers=8", "model.width=64", "model.in_features=32", "data.batch_size=32",
         "threads=1"]
CASES = [("gpipe", 2), ("1f1b", 4), ("interleaved", 4), ("zb_h1", 4), ("zbv", 4),
         ("dualpipev", 4)]


@pytest.mark.parametrize("name, m", CASES, ids=[f"{n}-m{m}" for n, m in CASES])
def test_pytorch_computes_our_losses(tmp_path, name, m):
    assert usable(name, 2, m)
    args = [*SMALL, *VIRTUAL.get(name, [])]
    _, bubble, mine, _ = ours(2, name, m, 3, args, tmp_path / "ours")
    theirs = torch_run(2, name, m, 3, args, tmp_path / "torch.json")
    assert len(mine) == len(theirs["losses"]) == 3
    assert theirs["losses"] == pytest.approx(mine, rel=1e-5)
    assert len(theirs["step_times"]) == 3 and min(theirs["step_times"]) > 0
    assert 0 < bubble < 1


def test_usable_cases_follow_each_schedules_requirements():
    assert not usable("interleaved", 2, 3) and usable("interleaved", 2, 4)
    assert not usable("dualpipev", 2, 3) and usable("dualpipev", 2, 4)
    assert not usable("1f1b", 2, 1) and usable("gpipe", 2, 1)
