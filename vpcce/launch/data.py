"""Synthetic benchmark data: "LM-like" peaked logits with a chosen mean entropy, and flat random.

Trained LMs put most softmax mass on a few tokens and spread a thin tail over the rest; random
matrices do not (every softmax entry ~ 1/V), which flatters kernels that skip small gradients.
Recipe (shared/README.md): classifier rows random with norm ~ 1 plus a shared "unigram"
direction with a log-Zipf profile; each hidden state is a multiple of its target's row plus
smaller multiples of a few Zipf-drawn rows, the unigram direction and noise; one scale factor
(found by bisection) sets the mean entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    e: torch.Tensor  # [N, D] hidden states
    c: torch.Tensor  # [V, D] classifier
    targets: torch.Tensor  # [N] int64
    mean_entropy: float  # nats, over a sample of tokens
    mean_nll: float


def _zipf(n: int, v: int, gen: torch.Generator, device) -> torch.Tensor:
    """n ranks in [0, v) with P(rank r) ~ 1 / (r + 2.7)^1.1 (a Zipf-Mandelbrot law).

    Drawn on the CPU (``gen`` is a CPU generator): CUDA's ``multinomial`` gave different draws
    in two processes with the same seed (H200, torch 2.11), so the benchmarks' data changed from
    run to run.
    """
    weights = (torch.arange(v, dtype=torch.float64) + 2.7).pow(-1.1)
    return torch.multinomial(weights.float(), n, replacement=True, generator=gen).to(device)


def sample_stats(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, sample: int = 256):
    """(mean entropy, mean NLL) in nats over the first ``sample`` tokens, fp32 logits."""
    z = e[:sample].float() @ c.float().T
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    nll = -logp.gather(1, targets[:sample, None]).mean().item()
    return entropy, nll


def lm_like(
    n: int,
    d: int,
    v: int,
    *,
    entropy: float,
    dtype=torch.bfloat16,
    device="cpu",
    seed: int = 0,
    sort_vocab: bool = False,
) -> Batch:
    """Peaked data whose mean softmax entropy is about ``entropy`` nats (bisection on a scale).

    ``sort_vocab`` numbers the vocabulary by frequency (as tokenizers roughly do), which
    concentrates the softmax mass in the first vocabulary tiles.
    """
    gen = torch.Generator(device).manual_seed(seed)
    draws = torch.Generator().manual_seed(seed)
    c = torch.randn(v, d, generator=gen, device=device) / math.sqrt(d)
    unigram = torch.randn(d, generator=gen, device=device)
    unigram /= unigram.norm()
    # log-Zipf profile in [-1, 0]: the most frequent token 0, the rarest -1
    profile = -torch.log(torch.arange(1, v + 1, dtype=torch.float32, device=device)) / math.log(v)
    ids = (
        torch.arange(v, device=device)
        if sort_vocab
        else torch.randperm(v, generator=gen, device=device)
    )
    c[ids] += 0.6 * profile[:, None] * unigram[None, :]  # rank-r token gets profile[r]
    targets = ids[_zipf(n, v, draws, device)]
    others = ids[_zipf(n * 4, v, draws, device)].view(n, 4)
    mix = torch.tensor([0.5, 0.3, 0.2, 0.1], device=device)
    direction = c[targets] + (c[others] * mix[None, :, None]).sum(1) + 0.5 * unigram
    direction += 0.3 * torch.randn(n, d, generator=gen, device=device) / math.sqrt(d)

    lo, hi = math.log(0.05), math.log(500.0)  # entropy falls as the scale grows
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        h, _ = sample_stats(direction * math.exp(mid), c, targets)
        lo, hi = (mid, hi) if h > entropy else (lo, mid)
    e = (direction * math.exp(0.5 * (lo + hi))).to(dtype)
    c = c.to(dtype)
    h, nll = sample_stats(e, c, targets)
    return Batch(e, c, targets, h, nll)


def flat(n: int, d: int, v: int, *, dtype=torch.bfloat16, device="cpu", seed: int = 0) -> Batch:
    """``randn`` hidden states and a classifier giving logits of std ~0.5 (near-uniform softmax)."""
    gen = torch.Generator(device).manual_seed(seed)
    e = torch.randn(n, d, generator=gen, device=device).to(dtype)
    c = (0.5 * torch.randn(v, d, generator=gen, device=device) / math.sqrt(d)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    h, nll = sample_stats(e, c, targets)
    return Batch(e, c, targets, h, nll)
