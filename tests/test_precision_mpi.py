"""precision=bf16 (CPU autocast): the split run equals one process bit for bit, bf16 boundary
tensors travel at half the bytes, and the pebbles each stage holds equal the bytes derived from
the code (harness/models/mlp.py activation_bytes, harness/models/gpt_memory.py with dtype_bytes=2)."""
import pytest

from helpers import SMALL, Batches, declare_runs, losses, meta, trace_frame

GPT = ["model.name=gpt", "gpt.layers=2", "gpt.d=32", "gpt.heads=2", "gpt.seq=16", "gpt.vocab=64",
       "data.batch_size=8", "train.lr=0.05", "threads=1", "quiet=true"]
MODELS = {"mlp": SMALL, "gpt": GPT}


def _todo():
    todo = {"weights": (2, [*SMALL, "train.steps=2", "precision=bf16", "schedule=gpipe",
                            "pipeline.microbatches=2"])}
    for name, args in MODELS.items():
        todo[f"{name}-one"] = (None, [*args, "precision=bf16", "train.steps=3"])
        todo[f"{name}-two"] = (2, [*args, "precision=bf16", "train.steps=3"])
    return todo


declare_runs(__name__, _todo())


@pytest.fixture(scope="module")
def runs():
    """Every run of this module, made with the session's other runs."""
    return Batches(__name__)


def _pebbles_equal_theory(d, world):
    th = meta(d)["pebbles_theory"]["bytes_per_microbatch"]
    for r in range(world):
        p = trace_frame(d, "pebbles", r)
        assert (p[p["step"] == 1].groupby("mb")["bytes"].sum() == th[r]).all(), (r, th)
        assert "bfloat16" in set(p["dtype"])


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_split_equals_one_process_and_follows_theory(runs, name):
    one, two = runs[f"{name}-one"], runs[f"{name}-two"]
    assert losses(two) == losses(one) and len(losses(one)) == 3
    _pebbles_equal_theory(one, 1)
    _pebbles_equal_theory(two, 2)
    mt = meta(two)
    assert mt["model"]["dtype"] == "bf16"
    shape, dtype = mt["model"]["boundary"][mt["split"][0][1] - 1]
    ev = trace_frame(two, "events", 0)
    sent = ev[ev["kind"] == "send"]["bytes"]
    elem = 2 if dtype == "bfloat16" else 4           # the MLP's boundary is bf16, the GPT's fp32
    n = 1
    for k in shape:
        n *= k
    assert (sent == n * elem).all() and len(sent) == 3
    if name == "mlp":
        assert dtype == "bfloat16"


def test_autocast_weight_copies_are_pebbles(runs):
    """Under CPU autocast each Linear whose input needs a gradient keeps the bf16 copy of its
    weight for backward: a pebble per microbatch, saved as weight.t() ([in, out]) (not a parameter's storage).
    At small microbatches these copies outweigh the halved activations (SMALL: width 64,
    batch 32), so bf16 does not always hold less than fp32."""
    d = runs["weights"]
    widths = meta(d)["model"]["widths"]
    for r, (first, end) in enumerate(meta(d)["split"]):
        p = trace_frame(d, "pebbles", r)
        p = p[(p["step"] == 1) & (p["dtype"] == "bfloat16")]
        for i in range(max(first, 1), end):
            w = p[(p["module"] == f"{i}.linear") & (p["shape"] == f"{widths[i]}x{widths[i + 1]}")]
            assert sorted(w["mb"]) == [0, 1], (r, i)
