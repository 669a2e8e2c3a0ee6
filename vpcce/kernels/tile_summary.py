"""Tile summaries: what the forward leaves so the backward can bound each tile's softmax unseen.

The forward already computes every token's largest logit of every vocabulary tile; it stores them
(``[vocab tiles, N]`` bf16, transient; tile-major, so each forward program's store is one
contiguous row segment). Once the global log-sum-exp is known, `tile_bounds`
reduces them to one number per backward tile (``[token blocks, vocab tiles]`` fp32, kept for
backward):

    bound[b, t] = max over tokens n of block b of (upper(tile_max[t, n]) - lse[n])  >=  log max p

so ``exp(bound)`` bounds every softmax entry of that ``[BLOCK_N, BLOCK_V]`` tile, and the backward
decides which tiles to skip (`vpcce.kernels.skip_plan`) without recomputing them. ``upper`` adds
2^-7 |x|, more than a bf16 rounding (round-to-nearest or the interpreter's truncation) can take
away. Memory: 2 bytes per token and tile in forward (16 MB at N 8192, V 256000), 256 KB kept.

Summaries need the forward's vocabulary tiles to be the backward's (`supported`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vpcce.kernels.common import blocks, cdiv, forward_blocks

SUMMARY_DTYPE = torch.bfloat16
_ROUNDING_MARGIN = 2.0**-7  # relative: bf16 keeps 8 significant bits


def supported(dtype: torch.dtype, num_tokens: int, vocab: int) -> bool:
    """True when the forward's vocabulary tiles are the backward's for ``dtype`` inputs and the
    summary's elements fit the kernels' int32 offsets."""
    cfg = blocks(dtype)
    return forward_blocks(dtype).v == cfg.v and cdiv(vocab, cfg.v) * num_tokens < 2**31


def tile_max_buffer(num_tokens: int, c: torch.Tensor) -> torch.Tensor:
    """The forward's ``[vocab tiles, N]`` output for shard ``c`` (when `supported`)."""
    tiles = cdiv(c.shape[0], blocks(c.dtype).v)
    return torch.empty((tiles, num_tokens), dtype=SUMMARY_DTYPE, device=c.device)


def tile_lse_buffer(num_tokens: int, c: torch.Tensor) -> torch.Tensor:
    """The forward's ``[vocab tiles, N]`` fp32 per-tile log-sum-exp for shard ``c`` (when
    `supported`; `vpcce.kernels.tail`): 4 bytes per token and tile, transient."""
    tiles = cdiv(c.shape[0], blocks(c.dtype).v)
    return torch.empty((tiles, num_tokens), dtype=torch.float32, device=c.device)


def bounds_shape(num_tokens: int, vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    """Shape of `tile_bounds`'s result: ``(token blocks, vocabulary tiles)`` of the backward."""
    cfg = blocks(dtype)
    return cdiv(num_tokens, cfg.n), cdiv(vocab, cfg.v)


@triton.jit
def _tile_bounds_kernel(
    tile_max_ptr,  # [T, N] bf16 tile maxima, or fp32 tile log-sum-exps
    lse_ptr,  # [N] fp32
    out_ptr,  # [cdiv(N, BLOCK_N), T] fp32
    N,
    T,
    stride_tmt,
    stride_on,
    margin,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < T
    n = pid_b * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    mask = n_mask[:, None] & t_mask[None, :]
    x = tl.load(
        tile_max_ptr + t.to(tl.int64)[None, :] * stride_tmt + n[:, None], mask=mask, other=0.0
    ).to(tl.float32)
    lse = tl.load(lse_ptr + n, mask=n_mask, other=0.0)
    finite = tl.abs(x) < float("inf")
    upper = tl.where(finite, x + tl.abs(x) * margin, x)  # -inf stays -inf, NaN stays NaN
    b = tl.where(mask, upper - lse[:, None], float("-inf"))
    b = tl.where(b != b, float("inf"), b)  # NaN logits: no bound, never skipped
    tl.store(out_ptr + pid_b * stride_on + t, tl.max(b, axis=0), mask=t_mask)


def tile_bounds(tile_max: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[token blocks, vocab tiles]`` fp32 log upper bounds of the softmax of each backward tile
    (``dtype``: the inputs' dtype, which picks the backward's tiles).

    Given the fp32 per-tile log-sum-exp (`tile_lse_buffer`) instead of the maxima, the same
    reduction gives the log of each tile's largest softmax mass over its block's tokens."""
    tiles, n = tile_max.shape
    block_n = blocks(dtype).n
    out = torch.empty((cdiv(n, block_n), tiles), dtype=torch.float32, device=lse.device)
    if out.numel() == 0:
        return out
    block_t = 64
    _tile_bounds_kernel[(out.shape[0], cdiv(tiles, block_t))](
        tile_max, lse, out, n, tiles, tile_max.stride(0), out.stride(0),
        _ROUNDING_MARGIN if tile_max.element_size() < 4 else 0.0,
        BLOCK_N=block_n, BLOCK_T=block_t,
    )
    return out
