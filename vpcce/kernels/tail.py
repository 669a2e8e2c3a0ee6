"""The softmax tail: the tiles ``filter_eps="auto"`` skips, and their first-order contribution.

On LM-like data most ``[BLOCK_N, BLOCK_V]`` tiles of ``dz`` hold a sliver of every token's
softmax mass, but together they carry 5% of it, and their classifier rows share a direction
(the "unigram" direction of a trained head), so dropping them costs ~50% hidden-gradient error
(docs/perf.md round 10). Their contribution to ``dE[n]`` is ``sum_v p[n, v] C[v]``; replacing every
``C[v]`` by the shard's mean row ``C̄`` keeps the shared direction and leaves
``sum_v p[n, v] (C[v] - C̄)``, a sum of small incoherent terms (round 20, fp64, Gemma 2 head at
1 nat, half a share: hidden-gradient error 9.3e-3 instead of 4.6e-1, 87% of the tiles skipped,
against the materialized baseline's 3.6e-2). The classifier gradient of a skipped tile,
``sum_n p[n, v] E[n]``, has a shared direction too (the tokens' hidden states share one): each
row of a skipped tile gets its block's skipped mass spread evenly over the block's skipped
columns (`class_rows`).

The correction is a first-order model, not a bound: on small heads it loses to the materialized
baseline (fp64 study, D 64-512 and V 8k-32k: hidden-gradient error up to 3x the baseline's). So
``filter_eps="auto"`` first checks it on a sample of tokens (`beats_baseline`): their exact
gradient rows against the corrected ones and the materialized bf16 baseline's, and skips the tail
only where the correction's errors are well below the baseline's (``"tail"`` skips unchecked).

So the forward stores each token's log-sum-exp of every vocabulary tile (`tile_summary`), and
once the global LSE is known `plan` marks the tiles below ``share`` times their uniform share
of every token of their block (``BLOCK_V / vocab``), never a tile holding one of the block's
targets, and sums each token's skipped mass. The backward skips the marked tiles (no recompute,
no GEMM K steps) and adds ``weight[n] * C̄`` to dE (`hidden_weights`) and each skipped tile's
share to its rows of dC (`class_rows`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vpcce.kernels import skip_plan
from vpcce.kernels.common import MM_OUT_DTYPE, blocks
from vpcce.kernels.tile_summary import tile_bounds

# Tokens of `sample_errors`' sample, and how far below the baseline's error the correction's
# must stay on it for the backward to skip the tail (`beats_baseline`).
SAMPLE_TOKENS = 16
ERROR_FRACTION = 0.5



@triton.jit
def _tail_mass_kernel(
    tile_lse_ptr,  # [T, N] fp32: each token's log-sum-exp of each vocabulary tile
    lse_ptr,  # [N] fp32 global log-sum-exp
    plan_ptr,  # [token blocks, T] int8: 1 = skipped
    out_ptr,  # [N] fp32 out: the skipped tiles' softmax mass
    N,
    T,
    stride_lt,
    stride_pb,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    lse = tl.load(lse_ptr + n, mask=n_mask, other=0.0)
    mass = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        skipped = tl.load(plan_ptr + pid * stride_pb + t, mask=t < T, other=0) != 0
        mask = n_mask[:, None] & skipped[None, :]
        x = tl.load(
            tile_lse_ptr + t.to(tl.int64)[None, :] * stride_lt + n[:, None], mask=mask, other=0.0
        )
        mass += tl.sum(tl.where(mask, tl.exp(x - lse[:, None]), 0.0), axis=1)
    tl.store(out_ptr + n, mass, mask=n_mask)


def plan(
    tile_lse: torch.Tensor,
    lse: torch.Tensor,
    y: torch.Tensor,
    *,
    vocab_start: int,
    vocab: int,
    vocab_size: int,
    share: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(plan, mass)``: int8 ``[token blocks, vocab tiles]``, 1 where the backward skips the tile,
    and fp32 ``[N]``, each token's softmax mass in its skipped tiles.

    ``tile_lse``: the forward's ``[vocab tiles, N]`` fp32 summary of this shard; ``y``: ``[N]``
    global target ids; ``vocab``: the shard's rows; ``vocab_size``: the global vocabulary (the
    uniform share's denominator); ``dtype``: the inputs' dtype, which picks the backward's tiles.
    Device work only.
    """
    cfg = blocks(dtype)
    tiles, n = tile_lse.shape
    bounds = tile_bounds(tile_lse, lse, dtype)  # log of each tile's largest mass in its block
    skip = skip_plan.plan(
        bounds, y, vocab_start=vocab_start, vocab=vocab,
        block_n=cfg.n, block_v=cfg.v, uniform_weight=0.0, filter_eps=share * cfg.v / vocab_size,
    )  # fmt: skip
    mass = torch.empty(n, dtype=torch.float32, device=lse.device)
    if n:
        _tail_mass_kernel[(skip.shape[0],)](
            tile_lse, lse, skip, mass, n, tiles, tile_lse.stride(0), skip.stride(0),
            BLOCK_N=cfg.n, BLOCK_T=64,
        )  # fmt: skip
    return skip, mass


def skipped_columns(skip: torch.Tensor, vocab: int, block_v: int) -> torch.Tensor:
    """fp32 ``[token blocks]``: the vocabulary columns each block skips (the last tile may be
    partial)."""
    widths = torch.full((skip.shape[1],), float(block_v), device=skip.device)
    widths[-1] = vocab - (skip.shape[1] - 1) * block_v
    return skip.float() @ widths


def hidden_weights(
    mass: torch.Tensor,
    skip: torch.Tensor,
    g_nll: torch.Tensor,
    g_lse: torch.Tensor | None,
    *,
    vocab: int,
    block_n: int,
    block_v: int,
    uniform_weight: float,
    logit_scale: float,
) -> torch.Tensor:
    """fp32 ``[N]``: ``w[n]`` such that the skipped tiles' dz adds ``w[n] * C̄`` to ``dE[n]``.

    A skipped entry (never a target) has ``dz = (g_nll + g_lse) p - g_nll u`` (``u``: the
    label-smoothing weight) times the logit scale, so its tiles sum ``(g_nll + g_lse)`` times
    the skipped mass minus ``g_nll u`` times the skipped columns, each against ``C̄``.
    """
    g_p = g_nll if g_lse is None else g_nll + g_lse
    w = g_p * mass
    if uniform_weight:
        cols = skipped_columns(skip, vocab, block_v)
        token_block = torch.arange(mass.numel(), device=mass.device) // block_n
        w = w - g_nll * uniform_weight * cols[token_block]
    return w * logit_scale


def mean_row(c: torch.Tensor) -> torch.Tensor:
    """fp32 ``[1, D]``: the mean of the shard's classifier rows, as one fp32-accumulated product
    with a ones row (a column reduction would stage a 340 MB fp32 partial at the Gemma 2 head,
    H200 round 20)."""
    ones = torch.ones((1, c.shape[0]), dtype=c.dtype, device=c.device)
    return _mm32(ones, c) / max(c.shape[0], 1)


def class_rows(
    weights: torch.Tensor,
    skip: torch.Tensor,
    e2: torch.Tensor,
    *,
    vocab: int,
    block_n: int,
    block_v: int,
) -> torch.Tensor:
    """fp32 ``[vocab tiles, D]``: what each row of a skipped tile adds to dC, to first order.

    Token ``n``'s skipped dz sums to ``weights[n]`` (`hidden_weights`); spread evenly over its
    block's skipped columns, a skipped tile ``t`` of block ``b`` adds
    ``sum_{n in b} weights[n] / cols[b] * E[n]`` to each of its rows."""
    cols = skipped_columns(skip, vocab, block_v)
    blocks_ = skip.shape[0]
    token_block = torch.arange(weights.numel(), device=weights.device) // block_n
    scale = weights / cols.clamp(min=1)[token_block]
    # [B, D]: each block's weighted hidden states, as one product (deterministic)
    onehot = torch.zeros((blocks_, weights.numel()), dtype=torch.float32, device=e2.device)
    onehot[token_block, torch.arange(weights.numel(), device=e2.device)] = scale
    per_block = _split_mm(onehot, e2)
    return skip.float().T @ per_block


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` into fp32 (16-bit operands: fp32 accumulation, no upcast copies on CUDA)."""
    if a.dtype != torch.float32 and a.dtype == b.dtype and a.is_cuda and MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _split_mm(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ b`` at about fp32 precision for a 16-bit ``b``: ``x`` as a 16-bit hi/lo pair."""
    if b.dtype == torch.float32:
        return x @ b
    hi = x.to(b.dtype)
    return _mm32(hi, b) + _mm32((x - hi.float()).to(b.dtype), b)


def _sum_estimate(gram: torch.Tensor, gram_e: torch.Tensor, n: int, coherent: bool) -> torch.Tensor:
    """Estimate of ``||sum over all N tokens of r[n] E[n]^T||^2`` from a sample of S tokens'
    ``gram = r r^T`` and ``gram_e = E E^T``: the diagonal scaled by N / S, and, for ``coherent``
    errors, the pairs by N (N - 1) / (S (S - 1)) (unbiased for a random sample). Independent
    errors (the baseline's roundings) have pairs of mean 0 whose sample sum is noise that the
    scale would blow up past the diagonal (H200, Llama head: a negative estimate), so they count
    the diagonal only."""
    size = gram.shape[0]
    terms = gram * gram_e
    diag = terms.diagonal().sum()
    total = diag * (n / size)
    if coherent:
        total = total + (terms.sum() - diag) * (n * (n - 1) / max(size * (size - 1), 1))
    return total.clamp(min=0)


def sample_errors(
    e2: torch.Tensor,
    c: torch.Tensor,
    c_mean: torch.Tensor,
    y_local: torch.Tensor,
    owned: torch.Tensor,
    lse: torch.Tensor,
    skip: torch.Tensor,
    mass: torch.Tensor,
    *,
    block_n: int,
    block_v: int,
    chunk: int = 65536,
) -> tuple[torch.Tensor, ...] | None:
    """``(tail dE, baseline dE, tail dC, baseline dC)`` error norms, estimated from `SAMPLE_TOKENS`
    evenly spread tokens of ``e2`` (None for fp32 inputs, whose baseline does not round).

    For the sample, in vocabulary chunks: the exact dz (``p - onehot``, the loss's, against the
    global LSE), the materialized baseline's (logits rounded to the inputs' dtype, its softmax
    normalized by their own log-sum-exp, dz rounded: ``c`` must be the whole vocabulary, as
    `vpcce.function` ensures), and the tail's skipped part.
    dE: the sample's rows of the exact, the baseline's and the corrected gradient, all through
    one product with each chunk of C. dC: its error is ``sum_n r[n] E[n]^T`` over all tokens,
    whose norm `_sum_estimate` estimates from ``[S, S]`` Gram matrices.
    """
    n, d = e2.shape
    if n < 2 or c.dtype == torch.float32:
        return None
    size = min(SAMPLE_TOKENS, n)
    idx = torch.linspace(0, n - 1, size, device=e2.device).round().long()
    es, lse_s, ys, own = e2[idx], lse[idx], y_local[idx], owned[idx]
    skip_s = skip[idx // block_n].bool()
    mass_s = mass[idx]
    cols_s = skipped_columns(skip, c.shape[0], block_v)[idx // block_n].clamp(min=1)
    starts = range(0, c.shape[0], chunk)
    # the baseline normalizes by its own 16-bit logits' log-sum-exp: against the exact one, a
    # confident token's rounded target logit would shift its whole row
    lse_base = torch.stack(
        [_mm32(es, c[v0 : v0 + chunk].T).to(c.dtype).float().logsumexp(dim=1) for v0 in starts]
    ).logsumexp(dim=0)
    rows = torch.zeros((5 * size, d), device=e2.device)
    g_base, g_tail = (torch.zeros((size, size), device=e2.device) for _ in range(2))
    for v0 in starts:
        cc = c[v0 : v0 + chunk]
        cols = torch.arange(v0, v0 + cc.shape[0], device=e2.device)
        onehot = ((cols[None, :] == ys[:, None]) & own[:, None]).float()
        z = _mm32(es, cc.T)
        dz_base = (torch.exp(z.to(c.dtype).float() - lse_base[:, None]) - onehot).to(c.dtype)
        dz = torch.exp(z - lse_s[:, None]) - onehot
        dropped = skip_s[:, cols // block_v]
        skipped = torch.where(dropped, dz, 0.0)
        dz_hi, skipped_hi = dz.to(c.dtype), skipped.to(c.dtype)
        parts = (dz_hi, (dz - dz_hi.float()).to(c.dtype), dz_base, skipped_hi,
                 (skipped - skipped_hi.float()).to(c.dtype))  # fmt: skip
        rows += _mm32(torch.cat(parts), cc)  # one read of the chunk for all five
        err_base = dz_base.float() - dz
        err_tail = skipped - torch.where(dropped, (mass_s / cols_s)[:, None], 0.0)
        g_base += err_base @ err_base.T
        g_tail += err_tail @ err_tail.T
    exact, base, lost = (
        rows[:size] + rows[size : 2 * size],
        rows[2 * size : 3 * size],
        rows[3 * size : 4 * size] + rows[4 * size :],
    )
    base_e = (base.to(c.dtype).float() - exact).norm()
    tail_e = (lost - mass_s[:, None] * c_mean).norm()
    gram_e = _mm32(es, es.T)
    base_c = _sum_estimate(g_base, gram_e, n, coherent=False).sqrt()
    tail_c = _sum_estimate(g_tail, gram_e, n, coherent=True).sqrt()
    return tail_e, base_e, tail_c, base_c


def beats_baseline(*args, **kwargs) -> bool:
    """Whether the corrected tail keeps both gradients within `ERROR_FRACTION` of the
    materialized baseline's error on `sample_errors`' sample (its arguments)."""
    errors = sample_errors(*args, **kwargs)
    if errors is None:
        return False
    tail_e, base_e, tail_c, base_c = errors
    return bool((tail_e <= ERROR_FRACTION * base_e) & (tail_c <= ERROR_FRACTION * base_c))
