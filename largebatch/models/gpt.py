"""A decoder-only Transformer language model: GPT-2 (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners") as nanoGPT writes it (Karpathy, github.com/karpathy/nanoGPT, `model.py`).

    idx [B, T] int64 -> token + learned position embeddings -> dropout
        -> n_layer x (x + attn(LN(x)); x + mlp(LN(x)))      pre-LayerNorm blocks
        -> LN -> x @ wte^T                                   the output head is the input embedding (tied)
        -> logits [B, T, vocab_size]

Attention is causal `F.scaled_dot_product_attention` (flash/memory-efficient kernels where the device has them),
the MLP is Linear(d, 4d) -> GELU -> Linear(4d, d). Initialisation as GPT-2's: every Linear and Embedding weight
N(0, 0.02), biases zero, and the two projections that write into the residual stream (`attn.c_proj`,
`mlp.c_proj`) N(0, 0.02 / sqrt(2 n_layer)), as the residual path accumulates 2 n_layer of them (Radford et al.
2019, sec. 2.3). Module names are nanoGPT's (`transformer.h.0.attn.c_attn`, ...), so its GPT-2 weight loader
maps onto this model. Like every model here it knows nothing of distribution or precision.

Parameters: V d + T d + L (12 d^2 + 13 d) + 2 d with biases (V vocab_size, T block_size, L n_layer, d n_embd;
the tied head adds none), L (12 d^2 + 2 d) + d without. The named sizes (`SIZES`, built-ins `gpt-*`), counted
at their own block size:

    name        layers heads embd block dropout bias  params at V = 65 (characters)  at V = 50257 (GPT-2 BPE)
    gpt-tiny       4     4    64    64   0.0    yes   208,320                        3,420,608
    gpt-mini       4     4   128    64   0.0    no    804,096                        7,228,672
    gpt-char       6     6   384   256   0.2    no    10,745,088                     30,018,816
    gpt2-small    12    12   768  1024   0.0    yes   85,892,352                     124,439,808

gpt-mini is nanoGPT's CPU "baby GPT" (README, "I only have a macbook"), gpt-char its `train_shakespeare_char`
GPU config (both without biases, nanoGPT's default; it prints 0.80M and 10.65M, not counting the position
embeddings), gpt2-small GPT-2's 124M model (nanoGPT prints 123.65M); gpt-tiny is a CPU test and study size.
Each factory takes the data's `vocab_size` and `block_size` (the model keyword protocol,
`largebatch.models.registry`; the sequence length sets the position table) and, as further keywords, overrides
of the size's fields (`dropout=0.1`, `bias=False`, `n_layer=2`); the protocol's other keywords are dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTSize", "SIZES", "count_params", "gpt_tiny", "gpt_mini", "gpt_char", "gpt2_small"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t only."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd = {n_embd} must be a multiple of n_head = {n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))  # each [B, heads, T, head_dim]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """Linear(d, 4d) -> GELU -> Linear(4d, d) -> dropout."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block (GPT-2 moved the norm to each sub-block's input): x + attn(LN(x)), then
    x + mlp(LN(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only Transformer LM (see the module docstring): `forward(idx [B, T] int64)` returns next-token
    logits [B, T, vocab_size], T <= block_size. `lm_head.weight` is `transformer.wte.weight` (one tensor)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        for k, v in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer)):
            if v < 1:
                raise ValueError(f"{k} = {v} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout = {dropout} must be in [0, 1)")
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd, bias=bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied (Press & Wolf 2017), as GPT-2
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        """GPT-2's: N(0, 0.02) for Linear and Embedding weights, zero biases, N(0, 0.02 / sqrt(2 n_layer)) for
        the residual projections. LayerNorms keep torch's (scale 1, shift 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[-1]
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's block_size = {self.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@dataclass(frozen=True)
class GPTSize:
    """A named size: everything but the data's vocab_size (block_size is the default sequence length)."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float = 0.0
    bias: bool = True


SIZES: dict[str, GPTSize] = {
    "gpt-tiny": GPTSize(n_layer=4, n_head=4, n_embd=64, block_size=64),
    "gpt-mini": GPTSize(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False),  # nanoGPT's CPU "baby GPT"
    "gpt-char": GPTSize(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False),  # shakespeare_char
    "gpt2-small": GPTSize(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 124M
}
"""The built-in sizes by model name (the module docstring gives their parameter counts)."""

DATA_KEYWORDS = frozenset({"num_classes", "in_channels", "image_size", "in_features", "out_features"})
"""The data keywords of `largebatch.models.registry` that a language model has no use for (dropped)."""


def count_params(vocab_size: int, block_size: int, n_layer: int, n_embd: int, bias: bool = True, **_: Any) -> int:
    """Parameters of `GPT(...)` by hand: embeddings V d + T d (the tied head adds none), per block two
    LayerNorms, q/k/v and output projections (4 d^2) and the 4x MLP (8 d^2), and the final LayerNorm."""
    norm = 2 * n_embd if bias else n_embd
    block = 12 * n_embd**2 + 2 * norm + ((3 + 1 + 4 + 1) * n_embd if bias else 0)
    return (vocab_size + block_size) * n_embd + n_layer * block + norm


def build(name: str, vocab_size: int, block_size: int | None = None, **overrides: Any) -> GPT:
    """The named size `name` for `vocab_size` tokens and sequences of `block_size` (None: the size's own), with
    `overrides` of its fields; the other data keywords of the registry protocol (`num_classes`, ...) are dropped."""
    size = SIZES[name]
    fields = {k: v for k, v in overrides.items() if k not in DATA_KEYWORDS}
    size = replace(size, **fields, **({"block_size": block_size} if block_size is not None else {}))
    return GPT(vocab_size, **asdict(size))


def gpt_tiny(vocab_size: int, block_size: int | None = None, **kw: Any) -> GPT:
    """4 layers, 4 heads, 64 wide, block 64: ~0.2M parameters at a character vocabulary (CPU tests, studies)."""
    return build("gpt-tiny", vocab_size, block_size, **kw)


def gpt_mini(vocab_size: int, block_size: int | None = None, **kw: Any) -> GPT:
    """nanoGPT's CPU "baby GPT": 4 layers, 4 heads, 128 wide, block 64, no dropout, no biases (0.80M at 65
    characters)."""
    return build("gpt-mini", vocab_size, block_size, **kw)


def gpt_char(vocab_size: int, block_size: int | None = None, **kw: Any) -> GPT:
    """nanoGPT's shakespeare_char GPU model: 6 layers, 6 heads, 384 wide, block 256, dropout 0.2, no biases
    (10.75M at 65 characters; nanoGPT prints 10.65M, without the position embeddings)."""
    return build("gpt-char", vocab_size, block_size, **kw)


def gpt2_small(vocab_size: int, block_size: int | None = None, **kw: Any) -> GPT:
    """GPT-2 small (Radford et al. 2019): 12 layers, 12 heads, 768 wide, block 1024; 124,439,808 parameters at
    GPT-2's vocabulary of 50,257 (nanoGPT prints 123.65M, without the position embeddings)."""
    return build("gpt2-small", vocab_size, block_size, **kw)
