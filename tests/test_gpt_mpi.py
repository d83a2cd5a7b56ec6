"""Any block model under mpirun: the GPT (and a user's factory model) split into 1, 2 and 4
stages trains exactly like one process, for every schedule; the pebbles each stage holds equal
the bytes derived by hand from the code (harness/models/gpt_memory.py); recomputation keeps the
losses and holds less."""
import json

import pytest
import torch

from harness import config
from harness.core import stage
from helpers import (Batches, declare_runs, losses, meta, run_harness, trace_frame,
                     weights)

# 4 blocks (embedding, 2 transformer blocks, head): small enough for ~import-time runs
GPT = ["model.name=gpt", "gpt.layers=2", "gpt.d=32", "gpt.heads=2", "gpt.seq=16", "gpt.vocab=64",
       "data.batch_size=8", "train.lr=0.05", "threads=1", "quiet=true", "train.steps=3",
       "run.save_weights=true"]
CASES = [(2, "naive", 1), (2, "gpipe", 2), (2, "1f1b", 4), (4, "1f1b", 4), (4, "gpipe", 4)]


IDS = [f"p{p}-{s}-m{m}" for p, s, m in CASES]
FACTORY = ["model.factory=examples.my_model:build", "data.batch_size=16", "threads=1",
           "quiet=true", "train.steps=3", "train.lr=0.05"]


def _todo():
    todo = {"ref": (None, GPT), "split4": (4, GPT),
            "factory-one": (None, FACTORY), "factory-two": (2, FACTORY),
            "balance-time": (2, [*GPT, "pipeline.balance=time"])}
    todo.update({f"recompute-{mode}": (2, [*GPT, f"pipeline.recompute={mode}"])
                 for mode in ("full", "attention")})
    todo.update({name: (p, [*GPT, f"schedule={sched}", f"pipeline.microbatches={m}"])
                 for name, (p, sched, m) in zip(IDS, CASES)})
    return todo


declare_runs(__name__, _todo())


@pytest.fixture(scope="module")
def runs():
    """Every successful run of this module, made with the session's other runs."""
    return Batches(__name__)


@pytest.fixture(scope="module")
def reference(runs):
    return runs["ref"]


def _same_weights(a, b, world):
    ref, got = weights(a, 1), weights(b, world)
    assert set(ref) == set(got)
    for blk in ref:
        for k in ref[blk]:
            assert torch.equal(got[blk][k], ref[blk][k]), f"block {blk} {k}"


def _peak_pebbles_equal_theory(d, world):
    mt = meta(d)
    th = mt["pebbles_theory"]
    for r in range(world):
        p = trace_frame(d, "pebbles", r)
        p = p[p["step"] == 1]
        per_mb = p.groupby("mb")["bytes"].sum()
        assert (per_mb == th["bytes_per_microbatch"][r]).all(), (r, per_mb.tolist(), th)


@pytest.mark.parametrize("p, sched, m", CASES, ids=IDS)
def test_gpt_stages_train_exactly_like_one_process(runs, reference, p, sched, m):
    d = runs[f"p{p}-{sched}-m{m}"]
    if m == 1:   # same arithmetic as one process: bit-identical (threads=1)
        assert losses(d) == losses(reference)
        _same_weights(reference, d, p)
    else:        # microbatches sum the gradient in another order: equal to rounding
        assert losses(d) == pytest.approx(losses(reference), rel=1e-5)
    mt = meta(d)
    assert mt["model"]["name"] == "gpt" and mt["model"]["layers"] == 4
    assert mt["model"]["boundary"][1][0] == [8 // m, 16, 32]         # [b, s, d] hidden states
    _peak_pebbles_equal_theory(d, p)


def test_gpt_single_process_matches_itself_split_in_four(runs, reference):
    d = runs["split4"]
    assert losses(d) == losses(reference)
    _same_weights(reference, d, 4)


@pytest.mark.parametrize("mode", ["full", "attention"])
def test_recomputation_keeps_the_losses_and_holds_less(runs, reference, mode):
    d = runs[f"recompute-{mode}"]
    assert losses(d) == pytest.approx(losses(reference), rel=1e-6)
    _peak_pebbles_equal_theory(d, 2)
    base = json.loads((reference / "meta.json").read_text())["pebbles_theory"]
    cfg = config.load([*GPT, "pipeline.recompute=none"], world_size=2)
    full = [stage.gpt_stage_bytes(cfg, b, 8, s == 1) for s, b in enumerate(meta(d)["split"])]
    assert base is not None
    assert all(a < b for a, b in zip(meta(d)["pebbles_theory"]["bytes_per_microbatch"], full))
    # every transformer block's recomputation is a span of its own, inside that microbatch's
    # backward call (the embedding and head are not checkpointed)
    for r, (first, end) in enumerate(meta(d)["split"]):
        ev = trace_frame(d, "events", r)
        rc, bwd = ev[ev["kind"] == "recompute"], ev[ev["kind"] == "bwd"]
        blocks = [i for i in range(first, end) if 1 <= i <= 2]
        assert sorted(rc.groupby(["step", "layer"]).size().index.get_level_values(1).unique()) \
            == blocks
        assert (rc.groupby(["step", "mb", "layer"]).size() == 1).all() and len(rc) == 3 * len(blocks)
        for row in rc.itertuples():
            b = bwd[(bwd["step"] == row.step) & (bwd["mb"] == row.mb)]
            assert b["t0"].min() <= row.t0 <= row.t1 <= b["t1"].max()


def test_a_users_factory_model_runs_split(runs):
    """examples/my_model.py (docs/models.md) under mpirun -n 2 = one process."""
    one, two = runs["factory-one"], runs["factory-two"]
    assert losses(two) == losses(one) and len(losses(one)) == 3
    assert meta(two)["model"]["name"] == "factory" and meta(two)["pebbles_theory"] is None
    # every rank built every block: the ranks compared their digests before step 0
    d = meta(two)["model"]["digests"]
    assert d["compared"] is True and d["note"] is None and len(d["blocks"]) == 6
    assert d == meta(one)["model"]["digests"]


def test_bad_factory_is_one_clear_line(tmp_path):
    proc = run_harness(2, "model.factory=examples.nope:build", "quiet=true",
                       f"run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "harness.run: error: model.factory='examples.nope:build': cannot import module "
        "'examples.nope' (No module named 'examples.nope')"]


def test_pebbles_name_the_sub_module_that_saved_them(reference):
    """Each transformer block's saved bytes, grouped by the sub-module the trace names, equal the
    hand derivation (gpt_memory.saved_bytes_per_block, grouped the same way by hand)."""
    from harness.models import gpt_memory
    g = {"vocab": 64, "seq": 16, "d": 32, "heads": 2, "layers": 2, "mlp_ratio": 4}
    it = gpt_memory.saved_bytes_per_block(g, 8)
    want = {"ln1": it["ln1.input"] + it["ln1.mean"] + it["ln1.rstd"], "attn.qkv": it["qkv.input"],
            "attn": it["qkv.heads"] + it["mask"] + it["softmax.out"],
            "attn.proj": it["proj.input"], "ln2": it["ln2.input"] + it["ln2.mean"] + it["ln2.rstd"],
            "mlp.fc": it["fc.input"], "mlp.act": it["gelu.input"], "mlp.proj": it["fc2.input"]}
    p = trace_frame(reference, "pebbles", 0)
    p = p[(p["step"] == 1) & (p["kind"] == "saved")]
    for k in (1, 2):                                   # blocks.0 and blocks.1 are blocks 1, 2
        b = p[p["layer"] == k]
        got = b.groupby("module")["bytes"].sum().to_dict()
        assert got == {f"blocks.{k - 1}.{m}": v for m, v in want.items()}
    soft = p[(p["module"] == "blocks.0.attn") & (p["shape"] == "8x2x16x16")]
    assert soft["dtype"].tolist() == ["float32"]        # the attention matrix [b, a, s, s]


def test_balance_by_measured_time_is_agreed_and_recorded(runs, reference):
    """pipeline.balance=time: every block's forward+backward is timed at set-up; rank 0's numbers
    decide the split (ranks measure differently), and meta.json records them."""
    d = runs["balance-time"]
    mt = meta(d)
    costs = mt["model"]["balance_costs"]
    assert mt["model"]["balance"] == "time" and len(costs) == 4 and all(c > 0 for c in costs)
    from harness.models.mlp import partition
    assert [list(b) for b in partition(costs, 2)] == mt["split"]
    assert losses(d) == losses(reference)     # any split trains the same model
