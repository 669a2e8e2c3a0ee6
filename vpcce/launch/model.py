"""The CPU demo's language model in plain PyTorch: a small pre-LN causal transformer body whose
LM head is a separate ``[V, D]`` weight, sharded by vocabulary over the ranks.

The body (embedding, blocks, final norm) is replicated: every rank builds it from the same seed
and sees the same batch, and vpcce (or the materialized path's identity-with-all-reduce) sums the
hidden-state gradient over the ranks, so the body's parameter gradients are the same on every
rank and need no reduction of their own. Each rank holds and updates only its head rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02  # GPT-2's initializer range


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """``tokens [B, T]`` int64 -> hidden states ``[B, T, D]`` (the LM head is not part of it)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=INIT_STD)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def head_shard(vocab_size: int, d_model: int, start: int, stop: int, seed: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a ``[V, D]`` head drawn from ``seed``: the same global weights
    whatever the number of ranks."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab_size, d_model, generator=gen) * INIT_STD)[start:stop].clone()
