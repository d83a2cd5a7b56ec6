"""The GPT block model and the block-model protocol: pure single-process tests, no MPI.

Saved bytes are measured two ways and must equal the hand derivation in gpt_memory.py exactly:
(1) saved_tensors_hooks deduplicating by storage (sum of untyped_storage().nbytes()), and
(2) the harness's own PebbleTracker, which deduplicates by (data_ptr, numel * element_size).
They agree whenever each saved storage is covered by views that start at distinct offsets or
have the same extent (true inside every GPT block: q, k, v start at different offsets of one
[3, b, a, s, dh] copy and together cover it). They differ when a saved tensor is a slice of a
larger storage: a microbatch view of the full batch saved by the embedding is charged the whole
batch by (1) and only its rows by (2) (test_storage_and_view_counts_differ_on_batch_slices).
"""
import itertools
import math
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from harness.models import BlockModel, load_factory, param_counts, probe_shapes
from harness.models import gpt_memory as gm
from harness.models.gpt import GPTCfg, build_gpt
from harness.trace.pebbles import PebbleTracker

ROOT = Path(__file__).resolve().parents[1]


def storage_bytes(fn, params):
    """-> (fn's output, saved bytes deduplicated by storage, parameters skipped)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def pebble_bytes(fn, params):
    tracker = PebbleTracker(time.perf_counter, params)
    with tracker.hooks():
        out = fn()  # keep `out` (and so its graph) alive while reading live_bytes
        return out, tracker.live_bytes


def both_counts(fn, params):
    return storage_bytes(fn, params)[1], pebble_bytes(fn, params)[1]


SHAPES = [  # (b, s, d, heads, mlp_ratio)
    (2, 8, 16, 2, 4), (3, 5, 24, 3, 4), (1, 16, 32, 4, 2), (4, 12, 8, 1, 4)]


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
@pytest.mark.parametrize("recompute", ["none", "attention", "full"])
@pytest.mark.parametrize("b, s, d, a, r", SHAPES)
@pytest.mark.parametrize("dtype_bytes", [4, 2])  # 2: bf16 autocast on CPU
def test_block_saved_bytes_equal_hand_derivation(b, s, d, a, r, attention, recompute,
                                                 dtype_bytes):
    c = GPTCfg(vocab=32, seq=s, d=d, heads=a, layers=1, mlp_ratio=r, attention=attention,
               recompute=recompute)
    blk = build_gpt(c, b, seed=0).blocks[1]
    x = torch.randn(b, s, d, requires_grad=True)  # a stage input: requires grad, as received
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_bytes == 2):
        got = both_counts(lambda: blk(x), list(blk.parameters()))
    want = gm.saved_bytes_per_block(c, b, dtype_bytes=dtype_bytes)
    assert got == (want["total"], want["total"]), want


@pytest.mark.parametrize("dtype_bytes", [4, 2])
def test_embed_head_and_loss_saved_bytes_and_whole_model_sum(dtype_bytes):
    c, b = GPTCfg(vocab=40, seq=6, d=16, heads=2, layers=2), 3
    m = build_gpt(c, b, seed=1)
    ids, tgt = m.data(0)
    params = [p for blk in m.blocks for p in blk.parameters()]
    h = torch.randn(b, c.seq, c.d, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_bytes == 2):
        assert both_counts(lambda: m.blocks[0](ids), params) == (gm.saved_bytes_embed(c, b)["total"],) * 2
        head = gm.saved_bytes_head(c, b, dtype_bytes)["total"]
        assert both_counts(lambda: m.blocks[-1](h), params) == (head, head)
        loss = gm.saved_bytes_loss(c, b)["total"]
        logits = torch.randn(b, c.seq, c.vocab, requires_grad=True)
        assert both_counts(lambda: m.loss(logits, tgt), params) == (loss, loss)

        def whole():
            x = ids
            for blk in m.blocks:
                x = blk(x)
            return m.loss(x, tgt)
        want = (gm.saved_bytes_embed(c, b)["total"] + head + loss
                + c.layers * gm.saved_bytes_per_block(c, b, dtype_bytes)["total"])
        # under autocast the weight copies are cached per autocast region: still one per Linear
        assert both_counts(whole, params) == (want, want)


def test_storage_and_view_counts_differ_on_batch_slices():
    c = GPTCfg(vocab=32, seq=8, d=16, heads=2, layers=1)
    m = build_gpt(c, 4, seed=0)
    ids = m.data(0)[0]                       # the full batch [4, 8], one storage
    micro = ids[:1]                          # a microbatch: a view of the first row
    params = list(m.blocks[0].parameters())
    assert both_counts(lambda: m.blocks[0](micro), params) == (8 * 4 * 8, 8 * 1 * 8)


def test_fp32_formula_is_korthikanti_adjusted_plus_layernorm_stats_and_mask():
    for b, s, d, a in [(2, 8, 16, 2), (8, 128, 256, 4), (1, 2048, 1024, 16)]:
        c = GPTCfg(seq=s, d=d, heads=a)
        mine = gm.saved_bytes_per_block(c, b)["total"]
        assert mine == gm.korthikanti_fp32_no_dropout(s, b, d, a) + 16 * b * s + s * s
        sel = gm.saved_bytes_per_block(c, b, recompute="attention")["total"]
        assert sel == gm.korthikanti_fp32_no_dropout(s, b, d, a, selective=True) + 16 * b * s
    assert gm.korthikanti_bytes(128, 8, 256, 4) == 128 * 8 * 256 * (34 + 5 * 4 * 128 / 256)


def run_blocks(blocks, x):
    for blk in blocks:
        x = blk(x)
    return x


def test_any_contiguous_split_is_bit_identical_to_the_whole_model():
    c, b = GPTCfg(vocab=32, seq=8, d=16, heads=2, layers=3), 2
    m = build_gpt(c, b, seed=5)
    again = build_gpt(c, b, seed=5)  # another rank builds the same weights
    for x, y in zip(m.blocks, again.blocks):
        assert all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters()))
    ids, tgt = m.data(0)
    whole = run_blocks(m.blocks, ids)
    m.loss(whole, tgt).backward()
    want_grads = [p.grad for blk in m.blocks for p in blk.parameters()]
    n = len(m.blocks)
    for k in range(1, n):
        for cuts in itertools.combinations(range(1, n), k):
            edges = (0, *cuts, n)
            for p in (p for blk in again.blocks for p in blk.parameters()):
                p.grad = None
            x, outs, ins = ids, [], []
            for lo, hi in zip(edges, edges[1:]):  # forward stage by stage, detached boundaries
                ins.append(x)
                outs.append(run_blocks(again.blocks[lo:hi], x))
                x = outs[-1].detach().requires_grad_()
            assert torch.equal(outs[-1], whole), cuts
            grad = None
            for out, inp in zip(reversed(outs), reversed(ins)):  # backward stage by stage
                (m.loss(out, tgt) if grad is None else out).backward(grad)
                grad = inp.grad
            got = [p.grad for blk in again.blocks for p in blk.parameters()]
            assert all(torch.equal(g, w) for g, w in zip(got, want_grads)), cuts


class CpuTensorInForward(torch.nn.Module):  # cannot run on meta: probe falls back to real
    def forward(self, x):
        return x + torch.ones(x.shape[-1])


@pytest.mark.parametrize("which", ["explicit", "sdpa", "full", "example", "fallback"])
def test_probe_shapes_match_a_real_forward(which):
    if which == "example":
        from examples.my_model import build
        m = build(None, 4, 0)
    else:
        c = GPTCfg(vocab=40, seq=8, d=16, heads=2, layers=2,
                   attention="sdpa" if which == "sdpa" else "explicit",
                   recompute="full" if which == "full" else "none")
        m = build_gpt(c, 4, 0)
        if which == "fallback":
            m.blocks.insert(1, CpuTensorInForward())
    for rows in (1, 3):
        x, real = m.example_input(rows), []
        for blk in m.blocks:
            x = blk(x)
            real.append((x.shape, x.dtype))
        assert probe_shapes(m, rows) == real


def test_param_counts():
    c = GPTCfg(vocab=40, seq=8, d=16, heads=2, layers=2, mlp_ratio=4)
    block = 2 * 2 * 16 + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 64 + 64) + (64 * 16 + 16)
    assert param_counts(build_gpt(c, 1, 0)) == [40 * 16 + 8 * 16, block, block, 2 * 16 + 16 * 40]


def train(m, steps, lr):
    params = [p for blk in m.blocks for p in blk.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses = []
    for step in range(steps):
        ids, tgt = m.data(step)
        loss = m.loss(run_blocks(m.blocks, ids), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_falls_on_the_markov_data():
    m = build_gpt(GPTCfg(layers=2, d=64, seq=64), batch_size=8, seed=0)
    losses = train(m, 30, lr=0.05)
    assert abs(losses[0] - math.log(256)) < 0.1       # starts at a uniform guess
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5       # and learns (entropy rate ~1.21)
    assert m.data.entropy < 1.25


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_recompute_modes_give_the_same_loss_and_gradients(attention):
    results = []
    for rc in ("none", "attention", "full"):
        m = build_gpt(GPTCfg(vocab=32, seq=8, d=16, heads=2, layers=2, attention=attention,
                             recompute=rc), 2, seed=3)
        ids, tgt = m.data(0)
        loss = m.loss(run_blocks(m.blocks, ids), tgt)
        loss.backward()
        results.append((loss.detach(), [p.grad for blk in m.blocks for p in blk.parameters()]))
    (l0, g0) = results[0]
    for loss, grads in results[1:]:
        assert torch.allclose(loss, l0, rtol=1e-6, atol=0)
        for g, w in zip(grads, g0):
            assert torch.allclose(g, w, rtol=1e-6, atol=1e-6 * w.abs().max().item())


def test_bf16_autocast_trains_with_fp32_residual_and_loss():
    m = build_gpt(GPTCfg(vocab=32, seq=8, d=16, heads=2, layers=2), 2, seed=0)
    ids, tgt = m.data(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = run_blocks(m.blocks[:-1], ids)
        logits = m.blocks[-1](h)
        loss = m.loss(logits, tgt)
    assert (h.dtype, logits.dtype, loss.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for blk in m.blocks for p in blk.parameters())


@pytest.fixture
def fake_module(monkeypatch):
    mod = types.ModuleType("fake_user_models")
    good = build_gpt(GPTCfg(vocab=8, seq=4, d=8, heads=2, layers=1), 2, 0)
    mod.ok = lambda cfg, batch_size, seed: good
    mod.not_a_model = lambda cfg, batch_size, seed: 42
    mod.bad_names = lambda cfg, batch_size, seed: BlockModel(
        good.blocks, good.loss, good.data, ["only-one"], good.example_input)
    mod.not_callable = 3
    monkeypatch.setitem(sys.modules, "fake_user_models", mod)
    return mod


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "expected 'package.module:function'"),
    ("no_such_package.mod:build", "cannot import module 'no_such_package.mod'"),
    ("fake_user_models:missing", "has no function 'missing'"),
    ("fake_user_models:not_callable", "has no function 'not_callable'"),
    ("fake_user_models:not_a_model", "returned int, expected harness.models.BlockModel"),
    ("fake_user_models:bad_names", "one name per block (3 blocks)"),
])
def test_load_factory_errors_name_the_spec(fake_module, spec, message):
    with pytest.raises(ValueError) as e:
        load_factory(spec, None, 2, 0)
    assert f"model.factory={spec!r}" in str(e.value) and message in str(e.value)


def test_load_factory_builds_the_worked_example(fake_module, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    assert load_factory("fake_user_models:ok", None, 2, 0) is fake_module.ok(None, 2, 0)
    m = load_factory("examples.my_model:build", None, 64, 0)
    assert m.names[0] == "stem" and m.names[-1] == "head"
    losses = train(m, 30, lr=0.05)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]       # ~2.3 -> ~1.0
