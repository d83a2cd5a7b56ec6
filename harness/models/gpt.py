"""A small decoder-only transformer (GPT) as a BlockModel: embed, N transformer blocks, head.

Attention is written out (q·kᵀ/√dh, causal masked_fill, softmax, ·v) so every tensor it saves for
backward is visible and countable (gpt_memory.py derives the bytes by hand); `attention="sdpa"`
swaps the core for F.scaled_dot_product_attention. Pre-LayerNorm as GPT-2 and nanoGPT; exact
(erf) GELU; no dropout; no weight tying between embedding and head (tying would couple the first
and last pipeline stages). Recomputation follows Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models": `full` checkpoints each transformer block, `attention`
only the attention core (their "selective" recomputation).

Default size (d=256, 8 layers, seq 128, vocab 256; ~6.4 M parameters) with batch 8 is sized for a
2-core CPU: one forward+backward takes well under a second with 2 threads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from harness.models.base import BlockModel, block_generator, recompute_context

ATTENTION = ("explicit", "sdpa")
RECOMPUTE = ("none", "full", "attention")


@dataclass
class GPTCfg:
    vocab: int = 256          # token ids 0..vocab-1 (bytes)
    seq: int = 128            # sequence length (and size of the learned position table)
    d: int = 256              # model width h
    heads: int = 4            # attention heads a; d must divide by it
    layers: int = 8           # transformer blocks
    mlp_ratio: int = 4        # MLP hidden width = mlp_ratio * d
    attention: str = "explicit"  # "explicit" (written out) or "sdpa" (F.scaled_dot_product_attention)
    recompute: str = "none"   # "none", "full" (whole block) or "attention" (core only; selective)


def gpt_cfg(cfg_like=None) -> GPTCfg:
    """A GPTCfg from any object with (some of) its fields as attributes or keys; checked."""
    get = (cfg_like.get if isinstance(cfg_like, dict)
           else lambda k, dflt: getattr(cfg_like, k, dflt))
    c = GPTCfg(**{f.name: get(f.name, f.default) for f in fields(GPTCfg)})
    for k in ("vocab", "seq", "d", "heads", "layers", "mlp_ratio"):
        if int(getattr(c, k)) < 1:
            raise ValueError(f"gpt.{k}={getattr(c, k)}: must be >= 1")
    if c.d % c.heads:
        raise ValueError(f"gpt.d={c.d} must divide by gpt.heads={c.heads}")
    if c.attention not in ATTENTION:
        raise ValueError(f"gpt.attention={c.attention!r}: allowed {ATTENTION}")
    if c.recompute not in RECOMPUTE:
        raise ValueError(f"gpt.recompute={c.recompute!r}: allowed {RECOMPUTE}")
    return c


class Embed(nn.Module):
    """Token + learned position embedding. ids: [b, s] int64 -> [b, s, d]."""

    def __init__(self, c: GPTCfg):
        super().__init__()
        self.tok = nn.Embedding(c.vocab, c.d)
        self.pos = nn.Parameter(torch.empty(c.seq, c.d))

    def forward(self, ids):
        # slicing the position Parameter saves nothing; the embedding lookup saves the ids
        return self.tok(ids) + self.pos[: ids.shape[1]]


class Attention(nn.Module):
    """Causal multi-head self-attention. x: [b, s, d] -> [b, s, d]."""

    def __init__(self, c: GPTCfg):
        super().__init__()
        self.heads, self.sdpa = c.heads, c.attention == "sdpa"
        self.recompute_core = c.recompute == "attention"
        self.qkv = nn.Linear(c.d, 3 * c.d)
        self.proj = nn.Linear(c.d, c.d)

    def core(self, q, k, v):
        """softmax(q·kᵀ/√dh + causal) · v; q, k, v, result: [b, a, s, dh]."""
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        s, dh = q.shape[-2], q.shape[-1]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))      # [b, a, s, s]
        # a fresh [s, s] mask per call: a buffer shared by all blocks would be one storage, and
        # a storage-deduplicating tracker would then charge it to the first block only
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu_(1)
        att = torch.softmax(att.masked_fill(mask, float("-inf")), dim=-1)
        return att @ v

    def forward(self, x):
        b, s, d = x.shape
        # one contiguous [3, b, a, s, dh] copy: q, k, v are views of it that bmm can use without
        # another copy (a permuted view would make torch.matmul copy each of q and kᵀ)
        qkv = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.contiguous().unbind(0)
        if self.recompute_core:
            y = checkpoint(self.core, q, k, v, use_reentrant=False,
                           context_fn=recompute_context(self.trace_name))
        else:
            y = self.core(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))          # reshape copies: [b, s, d]


class MLP(nn.Module):
    """x: [b, s, d] -> GELU(x W1 + b1) W2 + b2, hidden mlp_ratio * d."""

    def __init__(self, c: GPTCfg):
        super().__init__()
        self.fc = nn.Linear(c.d, c.mlp_ratio * c.d)
        self.act = nn.GELU()  # exact erf form, as nn.GELU's default
        self.proj = nn.Linear(c.mlp_ratio * c.d, c.d)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(.)). [b, s, d] -> [b, s, d]."""

    def __init__(self, c: GPTCfg):
        super().__init__()
        self.full = c.recompute == "full"
        self.ln1, self.attn = nn.LayerNorm(c.d), Attention(c)
        self.ln2, self.mlp = nn.LayerNorm(c.d), MLP(c)

    def body(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def forward(self, x):
        if self.full:  # keeps only x; backward reruns body (Korthikanti et al. 2022, "full")
            return checkpoint(self.body, x, use_reentrant=False,
                              context_fn=recompute_context(self.trace_name))
        return self.body(x)


class Head(nn.Module):
    """Final LayerNorm and LM head. [b, s, d] -> logits [b, s, vocab]."""

    def __init__(self, c: GPTCfg):
        super().__init__()
        self.ln = nn.LayerNorm(c.d)
        self.out = nn.Linear(c.d, c.vocab, bias=False)

    def forward(self, x):
        return self.out(self.ln(x))


def _init(block: nn.Module, gen: torch.Generator, layers: int) -> nn.Module:
    """GPT-2 initialisation (as nanoGPT) from the block's own generator, in parameter order."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            owner = block.get_submodule(name.rpartition(".")[0])
            if name.endswith("bias"):
                p.zero_()
            elif isinstance(owner, nn.LayerNorm):
                p.fill_(1.0)
            else:
                # residual-branch output projections scaled by 1/sqrt(2 * layers) (GPT-2)
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                p.normal_(0.0, std, generator=gen)
    return block


def build_blocks(c: GPTCfg, seed: int) -> list[nn.Module]:
    makers = [lambda: Embed(c)] + [lambda: TransformerBlock(c)] * c.layers + [lambda: Head(c)]
    out = []
    for i, make in enumerate(makers):
        # built on the meta device (no global-RNG draw, no memory), then given real storage
        # and initialised from the generator of (seed, block index)
        with torch.device("meta"):
            blk = make()
        for sub, mod in blk.named_modules():  # what a recomputation is called in the trace
            mod.trace_name = ".".join(x for x in ("embed" if i == 0 else "head" if
                                                  i == c.layers + 1 else f"blocks.{i - 1}", sub) if x)
        out.append(_init(blk.to_empty(device="cpu"), block_generator(seed, i), c.layers))
    return out


class MarkovData:
    """Token sequences from a fixed random first-order Markov chain with few likely successors.

    Each token has `len(probs)` distinct successors drawn once from the seed, taken with
    probabilities `probs`, so the best achievable loss is the chain's entropy rate (`entropy`,
    ~1.21 nats for the default) against ln(vocab) = 5.55 for a uniform guess: a model that
    learns the bigram table shows a clear fall. Batch of step t depends on (seed, t) only.
    """

    def __init__(self, c: GPTCfg, batch_size: int, seed: int, probs=(0.5, 0.25, 0.15, 0.1)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 1)
        p = torch.tensor(probs, dtype=torch.float64)
        succ = torch.stack([torch.randperm(c.vocab, generator=g)[: len(probs)]
                            for _ in range(c.vocab)])                   # [vocab, k]
        trans = torch.zeros(c.vocab, c.vocab, dtype=torch.float64)
        trans.scatter_(1, succ, p.expand(c.vocab, -1))
        self.cdf = trans.cumsum(1)                                       # [vocab, vocab]
        self.entropy = float(-(p * p.log()).sum())
        self.c, self.batch_size, self.seed = c, batch_size, seed

    def __call__(self, step: int):
        """-> (ids [B, seq] int64, targets [B, seq] int64): targets are ids shifted by one."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 104729 * (step + 2))
        b, s, v = self.batch_size, self.c.seq, self.c.vocab
        u = torch.rand(s, b, 1, generator=g, dtype=torch.float64)       # one uniform per draw
        toks = [torch.randint(0, v, (b,), generator=g)]
        for t in range(s):  # inverse-CDF sampling of each row's next token: [b, 1] -> [b]
            nxt = torch.searchsorted(self.cdf[toks[-1]], u[t]).squeeze(1)
            toks.append(nxt.clamp_(max=v - 1))
        x = torch.stack(toks, 1)                                         # [B, seq + 1]
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def lm_loss(logits, targets):
    """Mean cross-entropy over all positions. logits [b, s, V], targets [b, s] int64."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_gpt(cfg_like=None, batch_size: int = 8, seed: int = 0) -> BlockModel:
    """The GPT as a BlockModel: names "embed", "blocks.0".."blocks.N-1", "head"."""
    c = gpt_cfg(cfg_like)
    return BlockModel(
        blocks=build_blocks(c, seed),
        loss=lm_loss,
        data=MarkovData(c, batch_size, seed),
        names=["embed"] + [f"blocks.{i}" for i in range(c.layers)] + ["head"],
        example_input=lambda rows: torch.zeros(rows, c.seq, dtype=torch.int64),
    )
