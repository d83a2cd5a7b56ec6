"""The PyTorch names harness.torchpipe relies on exist in the pinned torch, and a missing one is
named, loudly, before anything is wrapped (harness/torchpipe/names.py)."""
import pytest

pytest.importorskip("torch.distributed.pipelining")
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe  # noqa: E402

from harness.torchpipe import names  # noqa: E402


def test_the_pinned_torch_has_every_name_the_instrument_uses():
    assert names.missing() == []
    names.check()


class _Stage(PipelineStage):
    backward_weight_one_chunk = None                 # gone

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full=True, last_backward=False):
        pass                                         # a parameter renamed


class _Schedule(ScheduleGPipe):
    _compute_loss = None


class _Elsewhere:                                    # no torch class behind it: no attributes
    def _compute_loss(self, output, target):
        pass


def test_a_missing_method_parameter_or_attribute_is_named():
    gone = names.missing(stage_cls=_Stage, single=(_Schedule, _Elsewhere))
    assert "_Stage.backward_weight_one_chunk" in gone
    assert "_Stage.backward_one_chunk(full_backward=)" in gone
    assert "_Schedule._compute_loss" in gone
    assert "_Elsewhere._n_microbatches" in gone and "_Elsewhere._stage" in gone
    assert not any(g.startswith("_Schedule._stage") for g in gone)   # inherited: still there


def test_check_raises_one_error_naming_them_all():
    with pytest.raises(names.TorchNamesMissing) as e:
        names.check(stage_cls=_Stage)
    msg = str(e.value)
    assert "_Stage.backward_weight_one_chunk" in msg and "(full_backward=)" in msg
    assert "harness/torchpipe/names.py" in msg and msg.count("\n") == 0
