"""Fused forward: per-token mergeable partials of one vocabulary shard, no logits in memory.

Math (see `vpcce.partials`): for each token ``n`` and each logits tile ``z[n, v0:v0+BLOCK_V]``
computed in registers (``e @ c.T`` with an fp32 accumulator, then bias, scale, softcap), update
online ``m = max z``, ``s = sum exp(z - m)``, ``x = sum exp(z - m) (z - m)``, ``sum z``, the
target logit and the argmax, rescaling the running sums when ``m`` grows.

Data flow: grid ``(token blocks, vocab splits)``. Split ``k`` walks its contiguous range of vocab
tiles and writes one ``[BLOCK_N, 6]`` partial into ``parts[k]``; `forward_partials` merges the
``[S, N, 6]`` buffer in split order with `vpcce.partials.merge_partials`. No atomics: every
output is written by exactly one program, so results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vpcce.kernels.common import (
    cdiv,
    dot_precision,
    even_d,
    forward_blocks,
    hopper_forward_blocks,
    logits_tile,
    plain_matrix,
    row_offsets,
    tma_descriptor,
    upcast_tiles,
)
from vpcce.layout import TokenLayout
from vpcce.partials import NUM_STATS, merge_partials

# Programs per SM the split count aims for, so short-N batches still fill the GPU.
_PROGRAMS_PER_SM = 4


@triton.jit
def _cce_fwd_kernel(
    # pointers
    e_ptr,  # [B, T', D] hidden states (strided view), or a TMA descriptor of them as [N, D]
    c_ptr,  # [V, D] classifier shard (strided), or its TMA descriptor
    bias_ptr,  # [V] bias shard (unused without HAS_BIAS)
    y_ptr,  # [B, T'] int targets, global ids (strided view)
    part_ptr,  # [S, N, 6] fp32, out: partials per split
    part_int_ptr,  # the same memory as int32, out: the ARGMAX column's bits
    summary_ptr,  # [vocab tiles, N] out (SUMMARY only): each token's max logit per tile (bf16),
    # or with SUMMARY_LSE its log-sum-exp over the tile (fp32)
    # shapes
    N,
    V,
    D,
    seq_len,
    vocab_start,
    tiles_per_split,
    # strides
    stride_eb,
    stride_et,
    stride_ed,
    stride_cv,
    stride_cd,
    stride_bias,
    stride_yb,
    stride_yt,
    stride_ps,
    stride_tmt,
    # scalars
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_ACC: tl.constexpr,
    SPLIT_EVERY: tl.constexpr,
    EVEN_D: tl.constexpr,
    TMA: tl.constexpr,
    FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    SUMMARY: tl.constexpr,
    SUMMARY_LSE: tl.constexpr,
    STATS: tl.constexpr,
    SUM_Z: tl.constexpr,
):
    # token blocks vary fastest: the running programs read each classifier tile at about one time
    # (splits-fastest order measured 3 ms slower on the Llama shape, round 9)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    e_rows = row_offsets(n, seq_len, stride_eb, stride_et)
    y = tl.load(y_ptr + row_offsets(n, seq_len, stride_yb, stride_yt), mask=n_mask, other=-1)
    y_local = y.to(tl.int64) - vocab_start  # outside [0, V) when another shard owns the target

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    arg = tl.zeros((BLOCK_N,), dtype=tl.int32)

    num_tiles = tl.cdiv(V, BLOCK_V)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    for t in tl.range(t_begin, t_end, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        v = t * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = v < V
        z = logits_tile(
            e_ptr,
            c_ptr,
            bias_ptr,
            e_rows,
            n_mask,
            v,
            v_mask,
            D,
            pid_n * BLOCK_N,
            t * BLOCK_V,
            stride_ed,
            stride_cv,
            stride_cd,
            stride_bias,
            logit_scale,
            softcap,
            HAS_BIAS,
            HAS_SOFTCAP,
            UPCAST,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            SPLIT_ACC,
            SPLIT_EVERY,
            EVEN_D,
            TMA,
        )
        z = tl.where(v_mask[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        if SUMMARY and not SUMMARY_LSE:  # the backward bounds each tile's softmax from it
            tl.store(
                summary_ptr + t * stride_tmt + n,  # a tile's tokens: one row (int32 offsets)
                tile_max.to(summary_ptr.dtype.element_ty),
                mask=n_mask,
            )
        if STATS:
            # NaN ranks highest (torch.argmax); the interpreter's argmax raises on all-NaN rows
            tile_arg = tl.argmax(tl.where(z != z, float("inf"), z), axis=1).to(tl.int32)
            arg = tl.where(tile_max > m, tile_arg + t * BLOCK_V, arg)  # strict: ties keep the first
        m_new = tl.maximum(m, tile_max)
        # -inf logits (a -inf bias masks vocabulary) weigh 0, as in the reference: while every
        # logit so far is -inf, shift by 0, not m_new, so no (-inf) - (-inf) = NaN appears
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        # rescale the running sums to the new max; an empty running state (s = 0) stays 0
        alpha = tl.exp(m - m_ref)
        if STATS:
            delta = tl.where(s > 0, m - m_ref, 0.0)  # m = -inf while s = 0: avoid -inf * 0
            x = alpha * (x + delta * s)
        s = s * alpha
        zs = tl.where(v_mask[None, :], z - m_ref[:, None], 0.0)
        p = tl.where(v_mask[None, :], tl.exp(zs), 0.0)
        s_tile = tl.sum(p, axis=1)
        s += s_tile
        if SUMMARY and SUMMARY_LSE:  # the tile's softmax mass, once the global LSE is known
            tl.store(summary_ptr + t * stride_tmt + n, m_ref + tl.log(s_tile), mask=n_mask)
        if STATS:
            x += tl.sum(tl.where(p > 0, p * zs, 0.0), axis=1)  # p = 0 at z = -inf: not 0 * -inf
        if SUM_Z:
            sum_z += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
        # v_mask: a target owned by the next shard can equal a padding column (z = -inf there)
        hit = (v[None, :] == y_local[:, None]) & v_mask[None, :]
        z_target += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m = m_new

    out = part_ptr + pid_s * stride_ps + n.to(tl.int64) * 6
    tl.store(out + 0, m, mask=n_mask)
    tl.store(out + 1, s, mask=n_mask)
    tl.store(out + 2, x, mask=n_mask)
    tl.store(out + 3, sum_z, mask=n_mask)
    tl.store(out + 4, z_target, mask=n_mask)
    out_int = part_int_ptr + pid_s * stride_ps + n.to(tl.int64) * 6
    tl.store(out_int + 5, arg + vocab_start, mask=n_mask)


def _hopper_forward(e2: torch.Tensor | None, c: torch.Tensor):
    """(`vpcce.kernels.forward_hopper`, its tiles) when that kernel takes these operands, else None.

    Imported on first use: Gluon is experimental and only this GPU path needs it.
    """
    cfg = hopper_forward_blocks()
    if cfg is None or c.device.type != "cuda":
        return None
    try:
        from vpcce.kernels import forward_hopper
    except ImportError:  # a Triton without Gluon's Hopper API
        return None
    return (forward_hopper, cfg) if forward_hopper.supported(e2, c, cfg) else None


def _num_splits(num_token_blocks: int, num_vocab_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = cdiv(_PROGRAMS_PER_SM * sms, num_token_blocks)
    return max(1, min(want, num_vocab_tiles))


def forward_partials(
    layout: TokenLayout,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    vocab_start: int,
    logit_scale: float,
    softcap: float | None,
    num_splits: int | None = None,
    chunk_bytes: int | None = None,
    tile_max: torch.Tensor | None = None,
    tile_lse: torch.Tensor | None = None,
    stats: bool = True,
    sum_z: bool = True,
) -> torch.Tensor:
    """[N, 6] fp32 partials of the shard ``c`` (global ids ``vocab_start + i``).

    ``stats=False`` skips the XLOGX and ARGMAX columns (the entropy and argmax outputs are not
    wanted), ``sum_z=False`` the SUMZ column (no label smoothing): their values then mean nothing.
    The loss and LSE need only MAX, SUMEXP and ZTARGET, and the other columns cost most of the
    tile epilogue's instructions (round 17, docs/perf.md).

    ``tile_max`` (from `vpcce.kernels.tile_summary.tile_max_buffer`), if given, receives each
    token's largest logit of every vocabulary tile; or ``tile_lse`` (`tile_lse_buffer`), the
    log-sum-exp of every tile's logits.

    ``num_splits`` (default: enough programs to fill the GPU) only changes the work split, not the
    result beyond fp32 rounding of the merge. ``chunk_bytes`` is accepted for parity with the
    reference: the fused forward holds no chunk.
    """
    del chunk_bytes
    assert tile_max is None or tile_lse is None, "one tile summary per forward"
    summary = tile_max if tile_max is not None else tile_lse
    e3, y2 = layout.e3, layout.y2
    n, (v, d) = layout.num_tokens, c.shape
    e2 = plain_matrix(e3)  # None when the tokens are not one [N, D] matrix view
    hopper = _hopper_forward(e2, c)
    if hopper is not None and n > 0:
        module, cfg = hopper
        vocab_tiles = cdiv(v, cfg.v)
        sms = torch.cuda.get_device_properties(c.device).multi_processor_count
        splits = num_splits or module.num_splits(n, vocab_tiles, cfg, sms)
        splits = max(1, min(splits, vocab_tiles))
        parts = torch.empty(splits, n, NUM_STATS, dtype=torch.float32, device=c.device)
        module.launch(
            e2, c, bias, y2, parts, summary, cfg,
            seq_len=layout.seq_len, vocab_start=vocab_start,
            tiles_per_split=cdiv(vocab_tiles, splits),
            logit_scale=logit_scale, softcap=softcap, stats=stats, sum_z=sum_z,
        )
        return parts[0] if splits == 1 else merge_partials(parts, stats=stats, sum_z=sum_z)
    cfg = forward_blocks(c.dtype)
    token_blocks = cdiv(max(n, 1), cfg.n)
    vocab_tiles = cdiv(v, cfg.v)
    splits = num_splits or _num_splits(token_blocks, vocab_tiles, c.device)
    splits = max(1, min(splits, vocab_tiles))
    parts = torch.empty(splits, n, NUM_STATS, dtype=torch.float32, device=c.device)
    if n == 0:
        return parts[0]
    bias_arg = bias if bias is not None else c
    e_desc = tma_descriptor(e2, [cfg.n, cfg.d])
    c_desc = tma_descriptor(c, [cfg.v, cfg.d])
    tma = e_desc is not None and c_desc is not None
    _cce_fwd_kernel[(token_blocks, splits)](
        e_desc if tma else e3,
        c_desc if tma else c,
        bias_arg,
        y2,
        parts,
        parts.view(torch.int32),
        summary if summary is not None else parts,
        n,
        v,
        d,
        layout.seq_len,
        vocab_start,
        cdiv(vocab_tiles, splits),
        e3.stride(0),
        e3.stride(1),
        e3.stride(2),
        c.stride(0),
        c.stride(1),
        bias_arg.stride(0),
        y2.stride(0),
        y2.stride(1),
        parts.stride(0),
        summary.stride(0) if summary is not None else 0,
        float(logit_scale),
        float(softcap or 1.0),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        UPCAST=upcast_tiles(c.dtype),
        DOT_PRECISION=dot_precision(c.dtype),
        BLOCK_N=cfg.n,
        BLOCK_V=cfg.v,
        BLOCK_D=cfg.d,
        SPLIT_ACC=cfg.split_acc,
        SPLIT_EVERY=cfg.split_every,
        EVEN_D=even_d(d, cfg),
        TMA=tma,
        FLATTEN=cfg.flatten,
        WARP_SPECIALIZE=cfg.warp_specialize,
        SUMMARY=summary is not None,
        SUMMARY_LSE=tile_lse is not None,
        STATS=stats,
        SUM_Z=sum_z,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return parts[0] if splits == 1 else merge_partials(parts, stats=stats, sum_z=sum_z)
