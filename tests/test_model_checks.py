"""A model checked before any step, one process, no MPI: what harness.core.stage.prepare refuses
and how it says it (tests/test_model_faults_mpi.py: the same under mpirun, said once), and the
digests the ranks compare (harness.models.digest)."""
import pytest
import torch
from torch import nn

from harness import config
from harness.core import stage
from harness.models import BlockModel
from harness.models.base import ModelError, UserCodeError, probe_shapes
from harness.models.digest import block_digest, first_difference
from helpers import REPO

MODELS = REPO / "tests" / "fixtures" / "models"


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.syspath_prepend(str(MODELS))
    import faulty
    return faulty


def prepared(factory: str, *args: str):
    """stage.prepare of faulty:`factory` for 2 ranks."""
    cfg, sched = config.load_with_schedule(
        [f"model.factory=faulty:{factory}", "data.batch_size=64", *args], world_size=2)
    rows = cfg.data.batch_size // cfg.pipeline.microbatches
    return stage.prepare(cfg, sched.placement.stages, rows)


def test_a_good_model_is_probed_and_digested(faulty):
    m = prepared("good")
    assert [tuple(s) for s, _ in m.shapes] == [(64, 32), (64, 32), (64, 32), (64, 2)]
    assert m.digests == [block_digest(b) for b in faulty.good(None, 64, 0).blocks]
    assert len(set(m.digests)) == 4   # every block drew its own weights


@pytest.mark.parametrize("args, message", [
    (["pipeline.microbatches=4", "schedule=1f1b"],
     "model.factory='faulty:hardcoded': block 1 'fixed' fails on a microbatch of 16 rows, its "
     "input [16, 32] float32: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    (["pipeline.microbatches=4", "schedule=1f1b", "precision=bf16"],
     "model.factory='faulty:hardcoded': block 1 'fixed' fails on a microbatch of 16 rows, its "
     "input [16, 32] bfloat16: RuntimeError: "),
])
def test_a_block_that_fails_on_a_microbatch_is_named(faulty, args, message):
    with pytest.raises(ModelError) as e:
        prepared("hardcoded", *args)
    assert str(e.value).startswith(message), e.value
    assert str(e.value).endswith(" (16 rows = data.batch_size=64 / pipeline.microbatches=4)")
    assert "\n" not in str(e.value)


def test_the_full_batch_still_runs_the_hardcoded_block(faulty):
    """The same model on one microbatch of 64 rows is fine: the check is about the microbatch."""
    assert len(prepared("hardcoded").shapes) == 4


def test_a_block_that_returns_a_tuple_is_named():
    m = BlockModel([nn.Linear(4, 4), nn.LSTM(4, 4, batch_first=True)], lambda o, y: o.sum(),
                   lambda s: None, ["a", "rnn"], lambda rows: torch.zeros(rows, 1, 4))
    with pytest.raises(ModelError, match=r"^block 1 'rnn' returns tuple, not one tensor, on a "
                                         r"microbatch of 3 rows, its input \[3, 1, 4\] float32$"):
        probe_shapes(m, 3)


def test_the_users_exception_keeps_its_traceback_without_the_harness(faulty):
    with pytest.raises(UserCodeError) as e:
        prepared("raises")
    lines = str(e.value).splitlines()
    assert lines[0] == "model.factory='faulty:raises' raised an exception:"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[2].endswith('faulty.py", line %d, in raises' % (
        1 + (MODELS / "faulty.py").read_text().splitlines().index(
            '    raise RuntimeError("the factory is broken")')))
    assert lines[-1] == "RuntimeError: the factory is broken"
    assert "harness" not in "\n".join(lines[1:])


def test_example_input_that_raises_is_the_users_code(faulty, monkeypatch):
    def example(rows):
        raise KeyError(rows)
    good = faulty.good(None, 64, 0)
    monkeypatch.setattr(faulty, "good", lambda *a: BlockModel(
        good.blocks, good.loss, good.data, good.names, example))
    with pytest.raises(UserCodeError) as e:
        prepared("good")
    assert str(e.value).startswith("model.factory='faulty:good': example_input(64) raised an "
                                   "exception:\nTraceback")
    assert str(e.value).endswith("KeyError: 64")


@pytest.mark.parametrize("args, message", [
    (["pipeline.virtual=3", "schedule=interleaved", "pipeline.microbatches=2"],
     "model.factory='faulty:good': 4 blocks, fewer than the 6 pipeline stages "
     "(ranks x pipeline.virtual)"),
    (["pipeline.split=[2,1]"],
     "pipeline.split=[2, 1]: sums to 3, model.factory='faulty:good' has 4 blocks"),
])
def test_a_factorys_block_count_is_checked_against_the_split(faulty, args, message):
    with pytest.raises(ModelError) as e:
        prepared("good", *args)
    assert str(e.value) == message


def test_digests_see_parameters_and_buffers():
    a, b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    assert block_digest(a) == block_digest(b)
    b.running_mean[0] = 1.0                       # a buffer
    assert block_digest(a) != block_digest(b)
    c = nn.BatchNorm1d(4).to(torch.bfloat16)      # same values, another dtype
    assert block_digest(c) != block_digest(a)


def test_the_first_block_that_differs_names_the_ranks():
    same = ["a", "b", "c"]
    assert first_difference([same, same, same], ["x", "y", "z"]) is None
    msg = first_difference([same, ["a", "B", "c"], same, ["a", "b", "C"], ["a", "B", "C"]],
                           ["x", "y", "z"])
    assert msg.startswith("ranks built different models: block 1 'y' has other initial weights "
                          "on ranks 1, 4 than on rank 0; ")
