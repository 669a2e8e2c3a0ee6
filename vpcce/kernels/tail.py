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
from vpcce.kernels.common import MM_OUT_DTYPE, blocks, cdiv
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


@triton.jit
def _round16(x, BF16: tl.constexpr):
    """fp32 ``x`` rounded to the nearest 16-bit value (ties to even), as fp32: bf16 through its
    bits (the Triton interpreter's bf16 casts truncate), fp16 through a cast."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
    else:
        rounded = x.to(tl.float16).to(tl.float32)
    return rounded


@triton.jit
def _sample_dz_kernel(
    z_ptr,  # [S, chunk] fp32: the sample's logits of a vocabulary chunk
    lse_ptr,  # [S] fp32: the exact log-sum-exp
    lse_base_ptr,  # [S] fp32: the baseline's, of its 16-bit logits
    y_ptr,  # [S] int64: the target's column in the chunk (anything outside it where not there)
    skip_ptr,  # [S, tiles] int8: the plan row of each token's block, from the chunk's first tile
    mass_ptr,  # [S] fp32: each token's skipped mass
    cols_ptr,  # [S] fp32: its block's skipped columns (at least 1)
    out_ptr,  # [4, S, chunk] 16-bit out: see `sample_errors`
    S,
    V,
    stride_zs,
    stride_ks,
    stride_ok,
    stride_os,
    BF16: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_V: tl.constexpr,
    TILE_V: tl.constexpr,
):
    s = tl.arange(0, BLOCK_S)
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    s_mask = s < S
    mask = s_mask[:, None] & (v < V)[None, :]
    z = tl.load(z_ptr + s[:, None] * stride_zs + v[None, :], mask=mask, other=0.0)
    lse = tl.load(lse_ptr + s, mask=s_mask, other=0.0)
    lse_base = tl.load(lse_base_ptr + s, mask=s_mask, other=0.0)
    y = tl.load(y_ptr + s, mask=s_mask, other=-1)
    onehot = tl.where(v[None, :] == y[:, None], 1.0, 0.0)
    dz = tl.exp(z - lse[:, None]) - onehot
    base = _round16(tl.exp(_round16(z, BF16) - lse_base[:, None]) - onehot, BF16)
    tile = (v // TILE_V)[None, :]
    dropped = tl.load(skip_ptr + s[:, None] * stride_ks + tile, mask=mask, other=0)
    mass = tl.load(mass_ptr + s, mask=s_mask, other=0.0)
    cols = tl.load(cols_ptr + s, mask=s_mask, other=1.0)
    skipped = tl.where(dropped != 0, dz, 0.0)
    err_tail = skipped - tl.where(dropped != 0, (mass / cols)[:, None], 0.0)
    hi = _round16(skipped, BF16)  # exact in 16 bits: the pair keeps the skipped dz's precision
    out = out_ptr + s[:, None] * stride_os + v[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out, err_tail.to(dtype), mask=mask)
    tl.store(out + stride_ok, (base - dz).to(dtype), mask=mask)
    tl.store(out + 2 * stride_ok, hi.to(dtype), mask=mask)
    tl.store(out + 3 * stride_ok, (skipped - hi).to(dtype), mask=mask)


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
    chunk: int = 131072,
) -> tuple[torch.Tensor, ...] | None:
    """``(tail dE, baseline dE, tail dC, baseline dC)`` error norms, estimated from `SAMPLE_TOKENS`
    evenly spread tokens of ``e2`` (None for fp32 inputs, whose baseline does not round). Device
    work only.

    The sample's logits come from one product with C; per vocabulary chunk, `_sample_dz_kernel`
    writes four 16-bit ``[S, chunk]`` rows: the tail's dz error (the skipped entries of the exact
    ``p - onehot``, against the global LSE, minus the block's skipped mass spread over its skipped
    columns), the materialized baseline's (its logits rounded to the inputs' dtype, its softmax
    normalized by their own log-sum-exp and rounded; ``c`` must be the whole vocabulary, as
    `vpcce.function` ensures), and the skipped entries as a hi/lo pair. dE: one product of the
    last three with the chunk of C gives the sample's error rows (the tail's: the skipped part
    minus ``mass * c_mean``; the baseline's leaves out its output's rounding, ~1e-3). dC: its
    error is ``sum_n r[n] E[n]^T`` over all tokens, whose norm `_sum_estimate` estimates from the
    ``[S, S]`` Gram matrices of the first two.
    """
    n, d = e2.shape
    if n < 2 or c.dtype == torch.float32:
        return None
    size = min(SAMPLE_TOKENS, n)
    idx = torch.linspace(0, n - 1, size, device=e2.device).round().long()
    es, lse_s = e2[idx], lse[idx]
    ys = torch.where(owned[idx], y_local[idx], -1)
    skip_s = skip[idx // block_n]
    mass_s = mass[idx]
    cols_s = skipped_columns(skip, c.shape[0], block_v)[idx // block_n].clamp(min=1)
    z = _mm32(es, c.T)  # [S, V] fp32, one read of C
    # the baseline normalizes by its own 16-bit logits' log-sum-exp: against the exact one, a
    # confident token's rounded target logit would shift its whole row
    lse_base = z.to(c.dtype).float().logsumexp(dim=1)
    chunk = min(chunk, c.shape[0])
    out = torch.empty((4, size, chunk), dtype=c.dtype, device=e2.device)
    rows = torch.zeros((3 * size, d), device=e2.device)
    gram = torch.zeros((2 * size, 2 * size), device=e2.device)
    block_s, block_v_ = max(16, triton.next_power_of_2(size)), 512 if c.is_cuda else 4096
    for v0 in range(0, c.shape[0], chunk):
        cc = c[v0 : v0 + chunk]
        width = cc.shape[0]
        _sample_dz_kernel[(cdiv(width, block_v_),)](
            z[:, v0:], lse_s, lse_base, ys - v0, skip_s[:, v0 // block_v :], mass_s, cols_s, out,
            size, width, z.stride(0), skip_s.stride(0), out.stride(0), out.stride(1),
            BF16=c.dtype == torch.bfloat16, BLOCK_S=block_s, BLOCK_V=block_v_, TILE_V=block_v,
            num_warps=8,
        )  # fmt: skip
        parts = out[:, :, :width]
        rows += _mm32(parts[1:].reshape(3 * size, width), cc)  # one read of the chunk
        errs = parts[:2].reshape(2 * size, width)
        gram += _mm32(errs, errs.T)
    base_e = rows[:size].norm()
    tail_e = (rows[size : 2 * size] + rows[2 * size :] - mass_s[:, None] * c_mean).norm()
    gram_e = _mm32(es, es.T)
    tail_c = _sum_estimate(gram[:size, :size], gram_e, n, coherent=True).sqrt()
    base_c = _sum_estimate(gram[size:, size:], gram_e, n, coherent=False).sqrt()
    return tail_e, base_e, tail_c, base_c


def beats_baseline(errors: tuple[torch.Tensor, ...] | None) -> bool:
    """Whether `sample_errors`' ``errors`` keep both gradients within `ERROR_FRACTION` of the
    materialized baseline's error (a host read)."""
    if errors is None:
        return False
    tail_e, base_e, tail_c, base_c = errors
    return bool((tail_e <= ERROR_FRACTION * base_e) & (tail_c <= ERROR_FRACTION * base_c))
