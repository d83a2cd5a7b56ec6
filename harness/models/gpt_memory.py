"""Bytes each GPT block saves for backward, derived by hand from gpt.py, against Korthikanti et al.

Counted the way a saved_tensors_hooks tracker counts (tests/test_gpt_model.py measures it): every
tensor autograd saves, deduplicated by storage (q, k, kᵀ and v are views of one [3, b, a, s, dh]
copy: one storage; the softmax output saved by softmax and by ·v: one), parameters excluded.
Notation: b microbatch rows, s = seq, d = h hidden, a heads, dh = d/a, r = mlp_ratio, V vocab.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1)
count s·b·h·(34 + 5·a·s/h) per layer in 16-bit with dropout; `korthikanti_fp32_no_dropout` turns
that into sbh·(64 + 4·a·s/h), and our block saves exactly that plus 16·b·s (LayerNorm mean and
rstd, which they omit) plus s² (the bool causal mask, which their fused kernel does not store).
"""
from __future__ import annotations

from harness.models.gpt import gpt_cfg


def _linear(items, name, rows_x_in, w_numel, lo):
    """A Linear saves its input (in the matmul dtype) for dW; under autocast also the cast copy
    of its weight (a new bf16 tensor, not a Parameter's storage, so a tracker counts it)."""
    items[f"{name}.input"] = lo * rows_x_in
    if lo != 4:
        items[f"{name}.weight_copy"] = lo * w_numel


def saved_bytes_per_block(cfg, b: int, dtype_bytes: int = 4, recompute: str | None = None,
                          attention: str | None = None) -> dict:
    """Saved bytes of one transformer block for a microbatch of b rows: {tensor: bytes, "total"}.

    dtype_bytes=4: fp32 training. dtype_bytes=2: CPU bf16 autocast, where matmul operands, the
    softmax and GELU run in bf16 but the residual stream and LayerNorm stay fp32 (LayerNorm is on
    CPU autocast's fp32 list; x + bf16 promotes to fp32) and each Linear also saves its bf16
    weight copy. recompute / attention default to cfg's.
    """
    c = gpt_cfg(cfg)
    rc, at = recompute or c.recompute, attention or c.attention
    s, d, a, r = c.seq, c.d, c.heads, c.mlp_ratio
    lo, bs, bsd = dtype_bytes, b * s, b * s * d
    if rc == "full":
        # checkpoint keeps only its input x: [b, s, d] fp32 (torch saves it as a SavedVariable,
        # so the outer hooks see it); everything inside is rebuilt in backward
        return {"block.input": 4 * bsd, "total": 4 * bsd}
    items = {
        "ln1.input": 4 * bsd,            # x [b, s, d]: LayerNorm saves its input ...
        "ln1.mean": 4 * bs,              # ... and mean [b, s, 1] and rstd [b, s, 1], fp32
        "ln1.rstd": 4 * bs,
    }
    _linear(items, "qkv", bsd, 3 * d * d, lo)               # ln1(x) [b*s, d]
    items["qkv.heads"] = 3 * lo * bsd  # [3, b, a, s, dh] contiguous copy: q, k, v views of it,
    # saved by q·kᵀ and ·v (explicit), by sdpa, or as the attention checkpoint's inputs
    if rc != "attention":
        if at == "explicit":
            items["mask"] = s * s                      # [s, s] bool, saved by masked_fill
            items["softmax.out"] = lo * b * a * s * s  # [b, a, s, s], saved by softmax and ·v
        else:
            # CPU flash kernel (_scaled_dot_product_flash_attention_for_cpu) saves q, k, v, its
            # output [b, a, s, dh] and logsumexp [b, a, s] (fp32 even under autocast)
            items["sdpa.out"] = lo * bsd
            items["sdpa.logsumexp"] = 4 * b * a * s
    _linear(items, "proj", bsd, d * d, lo)     # attention output, transposed and copied [b*s, d]
    if a == 1 and "sdpa.out" in items:
        # one head: transpose(1, 2) of [b, 1, s, dh] is already contiguous, reshape is a view,
        # so the projection saves sdpa's own output storage: one tensor, counted once
        del items["sdpa.out"]
    items.update({"ln2.input": 4 * bsd, "ln2.mean": 4 * bs, "ln2.rstd": 4 * bs})  # h = x + attn
    _linear(items, "fc", bsd, r * d * d, lo)                # ln2(h) [b*s, d]
    items["gelu.input"] = lo * r * bsd                      # fc output [b, s, r*d]
    _linear(items, "fc2", r * bsd, r * d * d, lo)           # GELU output [b*s, r*d]
    items["total"] = sum(items.values())
    return items


def saved_bytes_embed(cfg, b: int) -> dict:
    """Embedding block: the lookup saves its int64 ids [b, s]; the position slice saves nothing."""
    n = 8 * b * gpt_cfg(cfg).seq
    return {"ids": n, "total": n}


def saved_bytes_head(cfg, b: int, dtype_bytes: int = 4) -> dict:
    """Head block: final LayerNorm (input, mean, rstd) and the LM Linear's input."""
    c = gpt_cfg(cfg)
    bs = b * c.seq
    items = {"ln.input": 4 * bs * c.d, "ln.mean": 4 * bs, "ln.rstd": 4 * bs}
    _linear(items, "out", bs * c.d, c.d * c.vocab, dtype_bytes)
    items["total"] = sum(items.values())
    return items


def saved_bytes_loss(cfg, b: int) -> dict:
    """Cross-entropy (fp32 also under autocast): log_softmax output [b*s, V] (saved by
    log_softmax and nll_loss: one storage), int64 targets [b*s] and nll_loss's scalar total_weight."""
    c = gpt_cfg(cfg)
    items = {"log_softmax.out": 4 * b * c.seq * c.vocab, "targets": 8 * b * c.seq,
             "total_weight": 4}
    items["total"] = sum(items.values())
    return items


def korthikanti_bytes(s: int, b: int, h: int, a: int) -> float:
    """s·b·h·(34 + 5·a·s/h): activation bytes of one transformer layer, Korthikanti et al. 2022.

    Assumes 16-bit activations, 1-byte dropout masks (after attention softmax, after the attention
    projection, after the MLP), MLP width 4h, no tensor/sequence parallelism, no recomputation,
    and LayerNorm saving only its input. 34·sbh: attention 11 (QKV input 2, Q and K 4, V 2,
    projection input 2, dropout mask 1), MLP 19 (input 2, GELU input 8, GELU output 8, mask 1),
    two LayerNorm inputs 4; 5·a·s²·b: softmax output 2, its dropout mask 1, dropout output 2.
    Selective recomputation (attention core) leaves 34·sbh.
    """
    return s * b * h * (34 + 5 * a * s / h)


def korthikanti_fp32_no_dropout(s: int, b: int, h: int, a: int, selective: bool = False) -> float:
    """The same count for fp32 activations and no dropout: s·b·h·(64 + 4·a·s/h).

    Adjustments: every 2-byte activation becomes 4 bytes; the two sbh dropout masks (attention
    projection, MLP) go, so 34 - 2 = 32 two-byte units -> 64 bytes; in the attention core the mask
    and dropout output go (·v uses the softmax output itself), leaving the softmax output,
    2 -> 4 bytes per a·s²·b. With selective recomputation: 64·sbh.
    """
    return s * b * h * (64 + (0 if selective else 4 * a * s / h))
