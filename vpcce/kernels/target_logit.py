"""Each token's target logit, ``softcap(logit_scale * (e . c[y] + bias[y]))``: the ``ZTARGET``
partial of the Hopper forward (`vpcce.kernels.forward_hopper`), out of its tiles.

Picking the target's column out of every logits tile cost the tile epilogue a compare, a select
and an add per logit, for one column in ~V (docs/perf.md round 18). Here a program takes
``BLOCK_N`` tokens, gathers their targets' rows of C and runs the same tensor-core product as
the forward's tiles, token rows against those rows, keeping the diagonal. Its ``BLOCK_D``
steps chain ``SPLIT`` at a time from zero and add into the fp32 sum with an IEEE add, as the
forward does: on the GPU each value is the forward tile's logit, bit for bit, so that
``lse - z_target`` cancels the accumulation's rounding as it did when the tile picked it
(an fp32 dot product per token rounds differently, and that difference is all of a confident
token's loss). A target outside the shard (another rank's, or ``ignore_index``) gives 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vpcce.kernels.common import cdiv, row_offsets, tanh, upcast_tiles

BLOCK_N = 64  # tokens per program: the wgmma M


@triton.jit
def _target_logit_kernel(
    e_ptr, c_ptr, bias_ptr, y_ptr, out_ptr, N, V, D, seq_len, vocab_start, stride_en, stride_ed,
    stride_cv, stride_cd, stride_bias, stride_yb, stride_yt, stride_out, logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    y = tl.load(y_ptr + row_offsets(rows, seq_len, stride_yb, stride_yt), mask=n_mask, other=-1)
    v = y.to(tl.int64) - vocab_start
    owned = n_mask & (v >= 0) & (v < V)  # a target in this shard
    v = tl.where(owned, v, 0)
    e_rows = rows.to(tl.int64)[:, None] * stride_en
    c_rows = v[:, None] * stride_cv
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D * SPLIT):
        part = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(SPLIT):
            d = d0 + i * BLOCK_D + tl.arange(0, BLOCK_D)
            d_mask = (d < D)[None, :]
            e = tl.load(e_ptr + e_rows + d[None, :] * stride_ed, mask=n_mask[:, None] & d_mask,
                        other=0.0)  # fmt: skip
            c = tl.load(c_ptr + c_rows + d[None, :] * stride_cd, mask=owned[:, None] & d_mask,
                        other=0.0)  # fmt: skip
            if UPCAST:  # the interpreter computes 16-bit arithmetic wrongly
                e, c = e.to(tl.float32), c.to(tl.float32)
            part = tl.dot(e, tl.trans(c), part)
        acc = tl.fma(part, 1.0, acc)  # an IEEE add, not folded back into the chain
    diagonal = tl.arange(0, BLOCK_N)[:, None] == tl.arange(0, BLOCK_N)[None, :]
    z = tl.sum(tl.where(diagonal, acc, 0.0), axis=1)
    if HAS_BIAS:
        z += tl.load(bias_ptr + v * stride_bias, mask=owned, other=0.0).to(tl.float32)
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    tl.store(out_ptr + rows.to(tl.int64) * stride_out, tl.where(owned, z, 0.0), mask=n_mask)


def target_logits(
    e2: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    y2: torch.Tensor,
    out: torch.Tensor,
    *,
    seq_len: int,
    vocab_start: int,
    logit_scale: float,
    softcap: float | None,
    block_d: int,
    split: int,
) -> None:
    """Write token ``n``'s target logit into ``out[n]`` (fp32, any stride): ``e2`` ``[N, D]``,
    the shard ``c`` ``[V, D]`` (global ids ``vocab_start + i``), targets ``y2[n // seq_len,
    n % seq_len]``; 0 for a target outside the shard. ``block_d`` / ``split``: the forward
    tile's K step and chain length (16-bit operands on the GPU)."""
    n, (v, d) = e2.shape[0], c.shape
    if n == 0:
        return
    bias_arg = bias if bias is not None else c
    _target_logit_kernel[(cdiv(n, BLOCK_N),)](
        e2, c, bias_arg, y2, out, n, v, d, seq_len, vocab_start, e2.stride(0), e2.stride(1),
        c.stride(0), c.stride(1), bias_arg.stride(0), y2.stride(0), y2.stride(1), out.stride(0),
        float(logit_scale), float(softcap or 1.0), HAS_BIAS=bias is not None,
        HAS_SCALE=logit_scale != 1.0, HAS_SOFTCAP=softcap is not None,
        UPCAST=upcast_tiles(c.dtype), BLOCK_N=BLOCK_N, BLOCK_D=block_d, SPLIT=split,
        num_warps=4,
    )  # fmt: skip
