"""Backward: ``dL/dlogits`` recomputed tile by tile, then two gradient GEMMs per vocabulary chunk.

Math: with ``p = exp(z - lse)`` (global LSE), per token weights ``g`` (loss) and ``g_lse``
(LSE output) and ``q = target_weight [v = y] + uniform_weight`` (label smoothing),
``dz = (g + g_lse) p - g q``, times ``1 - (z / softcap)^2`` (softcap) and ``logit_scale``. The
target's column comes from the forward's target logit instead (`vpcce.kernels.target_dz`): its
16-bit value in dz, its rounding residual added to dE's fp32 accumulator.

Data flow, for each vocabulary chunk (`vpcce.kernels.grad_e.schedule`: its ``[N, rows]`` dz is
either the one logits-sized buffer, bounded by ``chunk_bytes``, or, for the larger early chunks,
dC's rows that no chunk has written yet):

1. `_cce_dlogits_kernel` recomputes the chunk's logits, writes ``dz`` in the input dtype, the
   per-token-block column sums of ``dz`` (bias gradient) and, when filtering, one flag per
   ``[BLOCK_N, BLOCK_V]`` tile whose every ``|p - q|`` is below ``filter_eps``;
2. ``dE += dz @ C[chunk]`` into an fp32 accumulator (`vpcce.kernels.grad_e` chooses where: usually
   half in dE's own buffer, half in dC's last rows, through cuBLAS);
3. ``dC[chunk] = dz^T @ E``, accumulated in fp32 registers over all tokens and written once
   (cuBLAS when the hidden states form one plain matrix on CUDA and dC is not filtered). Chunks
   whose dC rows hold the dE accumulator write dC after the last chunk, recomputing their dz.

Chunks run in order and every output tile has one owner: no atomics, bitwise reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vpcce.kernels import grad_e, skip_plan, target_dz
from vpcce.kernels.common import (
    DZ_DITHER_N,
    DZ_DITHER_V,
    blocks,
    cdiv,
    dot_precision,
    even_d,
    hopper_backward_blocks,
    interpreting,
    logits_tile,
    plain_matrix,
    row_offsets,
    stochastic_dz,
    tma_descriptor,
    upcast_tiles,
)
from vpcce.kernels.matmul import STORE, grad_matmul
from vpcce.kernels.tail import beats_baseline, class_rows, hidden_weights, mean_row, sample_errors
from vpcce.layout import TokenLayout
from vpcce.modes import BackwardMode

# Working memory of the backward beyond its outputs: the [N, chunk] dz buffer (plus, only when dE
# falls back to the hi/lo pair, its [N, D] 16-bit residual), so extra memory stays under 64 MB
# (issue 3's bar). dz never gets less than the floor: larger chunks are faster (H100, 2026-11-25:
# 16 MiB 162.7 ms, 32 MiB 139.8 ms, 64 MiB 126.8 ms fw+bw, round-3 kernels).
DEFAULT_WORK_BYTES = 56 * 2**20
MIN_DZ_BYTES = 16 * 2**20


@triton.jit
def _cce_dlogits_kernel(
    # pointers
    e_ptr,  # [B, T', D] hidden states (strided view), or a TMA descriptor of them as [N, D]
    c_ptr,  # [V, D] classifier shard (strided), or its TMA descriptor
    bias_ptr,  # [V] bias shard (unused without HAS_BIAS)
    y_ptr,  # [B, T'] int targets, global ids (strided view)
    lse_ptr,  # [N] fp32 global log-sum-exp
    g_nll_ptr,  # [N] fp32 loss weight per token (0 for ignored tokens)
    g_lse_ptr,  # [N] fp32 LSE-output weight per token (unused without HAS_GLSE)
    dzt_ptr,  # [N] the target column's dz in the dz dtype (`vpcce.kernels.target_dz`)
    dzt32_ptr,  # [N] fp32, the same before rounding (the bias gradient's; HAS_BIAS only)
    dz_ptr,  # [N, chunk] out: dL/d(e @ c.T + bias) of this chunk, input dtype
    skip_ptr,  # [token blocks, chunk tiles] int8 out: 1 = tile skipped (FILTER or PLAN only)
    plan_ptr,  # [token blocks, vocab tiles] int8: 1 = skip without recomputing (PLAN only)
    dbias_ptr,  # [token blocks, chunk] fp32 out: column sums of dz (HAS_BIAS only)
    # shapes
    N,
    D,
    seq_len,
    chunk_begin,
    chunk_len,
    vocab_start,
    # strides
    stride_eb,
    stride_et,
    stride_ed,
    stride_cv,
    stride_cd,
    stride_bias,
    stride_yb,
    stride_yt,
    stride_dzn,
    stride_skn,
    stride_pln,
    stride_dbn,
    # scalars
    logit_scale,
    softcap,
    target_weight,
    uniform_weight,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GLSE: tl.constexpr,
    FILTER: tl.constexpr,
    PLAN: tl.constexpr,
    ZERO_SKIPPED: tl.constexpr,
    UPCAST: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    DITHER_N: tl.constexpr,
    DITHER_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_ACC: tl.constexpr,
    SPLIT_EVERY: tl.constexpr,
    EVEN_D: tl.constexpr,
    TMA: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # Grouped order: GROUP_N token blocks walk the chunk's tiles together, so the running programs
    # share their hidden-state rows and the chunk's classifier rows in L2 (token-block-major order
    # re-streams all of E from HBM for every tile once N x D outgrows L2).
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(chunk_len, BLOCK_V)
    group = pid // (GROUP_N * num_tiles)
    first = group * GROUP_N
    group_size = tl.minimum(tl.cdiv(N, BLOCK_N) - first, GROUP_N)
    pid_n = first + pid % group_size
    pid_v = (pid % (GROUP_N * num_tiles)) // group_size
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    j_mask = j < chunk_len
    v = chunk_begin + j  # local vocabulary row
    e_rows = row_offsets(n, seq_len, stride_eb, stride_et)
    y = tl.load(y_ptr + row_offsets(n, seq_len, stride_yb, stride_yt), mask=n_mask, other=-1)
    y_local = y.to(tl.int64) - vocab_start
    valid = n_mask[:, None] & j_mask[None, :]
    dz_ptrs = dz_ptr + n.to(tl.int64)[:, None] * stride_dzn + j[None, :]
    planned = False
    if PLAN:  # the forward's tile bounds already showed this tile negligible: no recompute
        # (plans are made without a bias only: its gradient needs every tile's dz)
        planned = tl.load(plan_ptr + pid_n * stride_pln + chunk_begin // BLOCK_V + pid_v) != 0
    if planned:
        if ZERO_SKIPPED:  # a dense GEMM reads this tile
            tl.store(dz_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dz_ptr.dtype.element_ty), mask=valid)
        tl.store(skip_ptr + pid_n * stride_skn + pid_v, tl.full((), 1, tl.int8))
    else:
        lse = tl.load(lse_ptr + n, mask=n_mask, other=0.0)
        g = tl.load(g_nll_ptr + n, mask=n_mask, other=0.0)

        z = logits_tile(
            e_ptr,
            c_ptr,
            bias_ptr,
            e_rows,
            n_mask,
            v,
            j_mask,
            D,
            pid_n * BLOCK_N,
            chunk_begin + pid_v * BLOCK_V,
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
        p = tl.exp(tl.where(valid, z - lse[:, None], float("-inf")))  # padding rows/columns: p = 0
        q = tl.where(v[None, :] == y_local[:, None], target_weight, 0.0) + uniform_weight
        if HAS_GLSE:
            g_lse = tl.load(g_lse_ptr + n, mask=n_mask, other=0.0)
            dz = (g + g_lse)[:, None] * p - g[:, None] * q
            active = (g != 0) | (g_lse != 0)
            size = tl.maximum(tl.abs(p - q), p)  # the LSE gradient adds p itself
        else:
            dz = g[:, None] * (p - q)
            active = g != 0
            size = tl.abs(p - q)
        small = tl.full((), 0, tl.int1)
        if FILTER:
            size = tl.where(valid & active[:, None], size, 0.0)
            small = tl.max(tl.max(size, axis=1), axis=0) < filter_eps
        if FILTER or PLAN:
            tl.store(skip_ptr + pid_n * stride_skn + pid_v, small.to(tl.int8))
        if HAS_SOFTCAP:
            t = z / softcap
            dz = dz * (1.0 - t * t)  # d/dx [s tanh(x / s)] = 1 - tanh^2
        dz = tl.where(valid, dz * logit_scale, 0.0)
        # the target's column: the forward's logit, in fp64 (a padding row's y is -1: no column)
        is_target = v[None, :] == y_local[:, None]
        if HAS_BIAS:  # its unrounded value: the residual goes to dE only
            dz_t32 = tl.load(dzt32_ptr + n, mask=n_mask, other=0.0)
            dz_b = tl.where(is_target, dz_t32[:, None], dz)
            tl.store(dbias_ptr + pid_n * stride_dbn + j, tl.sum(dz_b, axis=0), mask=j_mask)
        dz_t = tl.load(dzt_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        dz = tl.where(is_target, dz_t[:, None], dz)
        if ZERO_SKIPPED:  # a dense GEMM reads this tile: drop it by its zeros (plans filter)
            dz = tl.where(small, 0.0, dz)
        if STOCHASTIC:  # bf16 (`common.STOCHASTIC_DZ`): a dither, then truncation
            rows, cols = n.to(tl.uint32) * DITHER_N, (v + vocab_start).to(tl.uint32) * DITHER_V
            lattice = rows[:, None] + cols[None, :]
            bits = dz.to(tl.uint32, bitcast=True) + (lattice >> 16)
            rounded = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)  # exact in bf16
            dz = tl.where(dz == dz, rounded, dz)
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=valid)


# A chunk whose plan keeps at most this fraction of its tiles takes the tile-skipping GEMM for
# that gradient; denser chunks take cuBLAS over a dz whose skipped tiles are zeros. The Triton
# GEMM: H100, 2^-12 filter (docs/perf.md, round 10): all-sparse / all-dense / thresholds 0.6 and
# 0.3 took 55 / 59 / 46 ms at Gemma 1 nat (sorted vocabulary, 94% of tiles dropped) but
# 145 / 117 / 135 ms at Llama 5 nats (70% dropped): it only pays off on nearly empty chunks.
SPARSE_E_MAX = 0.2
SPARSE_C_MAX = 0.1
# The warp-specialized Hopper GEMM (`vpcce.kernels.matmul_hopper`, round 16): every chunk, so
# the plan's density is never read on the host (a sync after the forward: the host could no
# longer run ahead, and the backward became host-bound). The price is paid by a filter that
# drops almost nothing: 1e-5 at Llama 5 nats (0.4% of tiles) took 121 ms against 110 exact,
# ~5 ms of it in these GEMMs against cuBLAS (docs/perf.md rounds 16, 16b).
HOPPER_SPARSE_E_MAX = 1.0
HOPPER_SPARSE_C_MAX = 1.0
# The tail (`vpcce.kernels.tail`) takes the planned Triton dlogits kernel instead of the Hopper
# one; below this fraction of skipped tiles the exact backward is the faster.
MIN_TAIL_SKIPPED = 0.5
# Where the tail's host reads decide the backward, the Hopper dlogits first runs the first chunk's
# leading columns worth this many flops (2 N D per column: ~0.5 ms on an H200), so the GPU is not
# idle while the host waits for the forward and sets out the rest (round 21: ~0.5-1 ms otherwise).
LEAD_FLOPS = 3 * 10**11


@dataclass(frozen=True)
class ChunkWork:
    """What the backward runs for one vocabulary chunk."""

    live: bool  # any tile is recomputed (else dz is all zeros: no kernel, dC rows zero)
    sparse_e: bool  # dE through `grad_matmul`, skipping the flagged tiles
    sparse_c: bool  # dC through `grad_matmul`, skipping the flagged tiles


def _may_sync(device: torch.device) -> bool:
    """Reading the plan's density on the host is allowed (not while capturing a CUDA graph)."""
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def sparse_limits(
    e2: torch.Tensor | None, c: torch.Tensor, grad_c: torch.Tensor, acc_e: grad_e.EGradAccumulator
) -> tuple[float, float]:
    """The densest chunk whose dE / dC GEMM skips tiles: `HOPPER_SPARSE_E_MAX` /
    `HOPPER_SPARSE_C_MAX` where the Hopper GEMM takes that gradient's calls
    (`matmul_hopper.takes`: dE into every part of its accumulator, dC from the hidden states as
    one matrix), else the Triton GEMM's `SPARSE_E_MAX` / `SPARSE_C_MAX`."""
    triton_limits = SPARSE_E_MAX, SPARSE_C_MAX
    if c.device.type != "cuda" or interpreting():
        return triton_limits
    try:
        from vpcce.kernels import matmul_hopper
    except ImportError:  # a Triton without Gluon's Hopper API
        return triton_limits
    cfg = blocks(c.dtype)
    e_takes = acc_e.kind != grad_e.HI_LO_PAIR and all(
        matmul_hopper.takes(c, plain_matrix(acc3), c.dtype, (cfg.n, cfg.v))
        for _, _, acc3 in acc_e.parts
    )
    c_takes = matmul_hopper.takes(e2, grad_c, c.dtype, (cfg.v, cfg.n))
    return (
        HOPPER_SPARSE_E_MAX if e_takes else SPARSE_E_MAX,
        HOPPER_SPARSE_C_MAX if c_takes else SPARSE_C_MAX,
    )


def chunk_work(
    order: list[grad_e.Chunk],
    mode: BackwardMode,
    plan: torch.Tensor | None,
    tile: int,
    limits: tuple[float, float] | None = None,
) -> list[ChunkWork]:
    """Per chunk of ``order``: skip it, or which GEMMs skip tiles (``limits``: `sparse_limits`;
    default: the Triton GEMM's).

    With a plan, one host read of its per-chunk density (outside CUDA graph capture; during
    capture every chunk runs dense, with the same result up to summation order), unless
    ``limits`` make every chunk sparse.
    """
    limits = limits or (SPARSE_E_MAX, SPARSE_C_MAX)
    if plan is None:  # compute-time filter only: its flags are known after the dlogits kernel
        filtering = mode.filter_eps is not None
        work = ChunkWork(True, filtering and mode.filter_e_grad, filtering and mode.filter_c_grad)
        return [work] * len(order)
    if min(limits) >= 1.0:  # both GEMMs skip tiles at any density: nothing to read
        # (the host runs ahead into the backward while the forward computes; an empty chunk
        # costs a dlogits pass over flags and two GEMMs with no K steps)
        return [ChunkWork(True, True, True)] * len(order)
    if not _may_sync(plan.device):
        return [ChunkWork(True, False, False)] * len(order)
    live_tiles = (plan == 0).sum(dim=0).tolist()  # the one host read
    blocks_ = plan.shape[0]
    out = []
    for ch in order:
        v0, cl = ch.begin, ch.rows
        tiles = live_tiles[v0 // tile : cdiv(v0 + cl, tile)]
        density = sum(tiles) / (blocks_ * len(tiles))
        out.append(ChunkWork(density > 0, density <= limits[0], density <= limits[1]))
    return out


def _hopper_dlogits(e2: torch.Tensor | None, c: torch.Tensor, exact: bool):
    """(`vpcce.kernels.backward_hopper`, its tiles) when that kernel takes this backward: exact
    (no filter flags, no plan), no bias, and operands TMA can address; else None. The dz views
    it writes are aligned by construction: the dz buffer and dC are fresh allocations, the
    borrowing chunks' offsets are multiples of 64 elements and their widths whole tiles."""
    cfg = hopper_backward_blocks()
    if cfg is None or not exact or c.device.type != "cuda" or cfg.v != blocks(c.dtype).v:
        return None
    try:
        from vpcce.kernels import backward_hopper
    except ImportError:  # a Triton without Gluon's Hopper API
        return None
    return (backward_hopper, cfg) if backward_hopper.supported(e2, c, cfg) else None


def _read_later(x: torch.Tensor) -> Callable[[], bool]:
    """``read() -> bool(x)``, with the device-to-host copy queued now: the host waits at
    ``read()`` for that copy alone, not for work queued after it (CPU: no copy)."""
    if x.device.type != "cuda":
        return lambda: bool(x)
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> bool:
        done.synchronize()
        return bool(host)

    return read


@dataclass(frozen=True)
class SkippedTail:
    """The softmax tail a backward skips (`vpcce.kernels.tail`), and what it adds instead."""

    plan: torch.Tensor  # int8 [token blocks, vocab tiles]: 1 = skipped
    e_weights: torch.Tensor  # fp32 [N]: dE[n] += e_weights[n] * c_mean
    c_mean: torch.Tensor  # fp32 [1, D]: the shard's mean classifier row
    c_rows: torch.Tensor  # [vocab tiles, D], input dtype: each skipped tile's rows' dC share


def _skipped_tail(
    tail: tuple[torch.Tensor, torch.Tensor],
    e2: torch.Tensor | None,
    c: torch.Tensor,
    y_local: torch.Tensor,
    owned: torch.Tensor,
    lse: torch.Tensor,
    g_nll: torch.Tensor,
    g_lse: torch.Tensor | None,
    *,
    mode: BackwardMode,
    uniform_weight: float,
    logit_scale: float,
) -> SkippedTail | None:
    """The tail of the forward's plan (``tail``: its tiles and each token's mass in them), thick
    enough to skip, where the backward skips it: always for an unchecked mode, else where a
    sample shows the correction beating the materialized baseline (a host read); else None
    (exact).

    The correction is enqueued before the verdict's read, so the GPU has work queued when the
    host resumes (wasted where the check refuses the tail)."""
    skip, mass = tail
    cfg = blocks(c.dtype)
    v, c_mean = c.shape[0], mean_row(c)
    errors = None
    if mode.tail_checked:
        errors = sample_errors(
            e2, c, c_mean, y_local, owned, lse, skip, mass, block_n=cfg.n, block_v=cfg.v
        )  # fmt: skip
    weights = hidden_weights(
        mass, skip, g_nll, g_lse, vocab=v, block_n=cfg.n, block_v=cfg.v,
        uniform_weight=uniform_weight, logit_scale=logit_scale,
    )  # fmt: skip
    rows = class_rows(weights, skip, e2, vocab=v, block_n=cfg.n, block_v=cfg.v).to(c.dtype)
    if mode.tail_checked and not beats_baseline(errors):
        return None
    return SkippedTail(skip, weights, c_mean, rows)


def backward(
    layout: TokenLayout,
    grad_e3: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    lse: torch.Tensor,
    g_nll: torch.Tensor,
    g_lse: torch.Tensor | None,
    vocab_start: int,
    target_weight: float,
    uniform_weight: float,
    logit_scale: float,
    softcap: float | None,
    mode: BackwardMode,
    chunk_bytes: int | None = None,
    z_target: torch.Tensor,
    grad_e_ready: Callable[[], None] | None = None,
    tile_bounds: torch.Tensor | None = None,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Write ``dL/de`` into ``grad_e3`` ``[B, T', D]``; return ``(grad_c, grad_bias)`` of the shard.

    ``z_target`` ``[N]``: each token's target logit (the forward's merged ``ZTARGET`` partial),
    which gives the target column of dz (`vpcce.kernels.target_dz`).

    ``grad_e_ready`` is called once ``grad_e3`` is final, before the last chunk's dC GEMM, so a
    vocab-parallel caller can overlap the hidden-gradient reduction with it.

    ``chunk_bytes`` bounds the ``[N, chunk]`` dz buffer (default: what `DEFAULT_WORK_BYTES` leaves
    after the dE residual, at least `MIN_DZ_BYTES`).

    ``tile_bounds`` (`vpcce.kernels.tile_summary.tile_bounds` of the forward) lets ``filter_eps``
    skip tiles without recomputing them (`vpcce.kernels.skip_plan`).

    ``tail`` (`vpcce.kernels.tail.plan` of the forward: the tail's tiles and each token's mass in
    them) skips those tiles and adds their first-order contribution to dE and dC, when they are
    at least `MIN_TAIL_SKIPPED` of the tiles and (``mode.tail_checked``) a sample shows the
    correction beating the materialized baseline (host reads; not during CUDA graph capture):
    else the backward is exact.
    """
    n, (v, d) = layout.num_tokens, c.shape
    # the kernel indexes the per-token vectors densely: an LSE gradient can be a stride-0
    # expansion (``lse.sum().backward()`` hands one in); lse and g_nll are dense from
    # `vpcce.function` and cost nothing here, but this function is called directly too
    lse, g_nll = lse.contiguous(), g_nll.contiguous()
    g_lse = None if g_lse is None else g_lse.contiguous()
    y_local = layout.flat_targets() - vocab_start
    owned = (y_local >= 0) & (y_local < v)
    dz_target32 = target_dz.target_dz(
        z_target, lse, g_nll, g_lse, target_weight=target_weight, uniform_weight=uniform_weight,
        logit_scale=logit_scale, softcap=softcap,
    )  # fmt: skip
    dz_target, residual = target_dz.split(dz_target32, c.dtype, owned)
    grad_c = torch.empty((v, d), dtype=c.dtype, device=c.device)
    grad_bias = None if bias is None else torch.empty_like(bias)
    if n == 0:
        grad_c.zero_()
        if grad_e_ready is not None:
            grad_e_ready()
        return grad_c, None if grad_bias is None else grad_bias.zero_()

    cfg = blocks(c.dtype)
    upcast, precision = upcast_tiles(c.dtype), dot_precision(c.dtype)
    acc_e = grad_e.accumulator(
        grad_e3,
        grad_c,
        accum_fp32=mode.accum_e_fp32,
        tile=cfg.v,
        work_bytes=DEFAULT_WORK_BYTES,
        min_dz_bytes=MIN_DZ_BYTES,
        chunk_bytes=chunk_bytes,
        row_block=cfg.n,
        # the bias gradient's per-token-block column sums are as wide as the largest chunk
        borrow=bias is None,
    )
    widest = max(ch.rows for ch in acc_e.chunks)
    token_blocks = cdiv(n, cfg.n)
    e2 = plain_matrix(layout.e3)  # None when the tokens are not one [N, D] matrix view
    e_desc = tma_descriptor(e2, [cfg.n, cfg.d])
    c_desc = tma_descriptor(c, [cfg.v, cfg.d])
    tma = e_desc is not None and c_desc is not None
    gemm = {"upcast": upcast, "precision": precision, "warps": cfg.warps, "stages": cfg.gemm_stages}
    # cuBLAS takes dC when the hidden states form one plain matrix on CUDA (else torch.mm would
    # copy E): 0.068 ms vs 0.20 ms for `grad_matmul` per 8192 x 2304 x 1280 chunk (H100)
    e2d = e2 if c.device.type == "cuda" else None
    filtering = mode.filter_eps is not None
    plan = None
    # a plan needs the forward's bounds, and both gradients (and no bias gradient) free to drop
    plannable = bias is None and mode.filter_e_grad and mode.filter_c_grad
    if filtering and tile_bounds is not None and plannable:
        plan = skip_plan.plan(
            tile_bounds,
            layout.flat_targets(),
            vocab_start=vocab_start,
            vocab=v,
            block_n=cfg.n,
            block_v=cfg.v,
            uniform_weight=uniform_weight,
            filter_eps=mode.filter_eps,
        )
    # the exact backward's Hopper dlogits, set up before the tail's host reads: these wait for
    # the forward, and host work after them leaves the GPU idle (1.1 ms at Gemma, round 21)
    hopper = _hopper_dlogits(e2, c, bias is None and not filtering and plan is None)
    if hopper is not None:
        module, hopper_cfg = hopper
        hopper_dlogits = module.launcher(
            e2, c, layout.y2, lse, g_nll, g_lse, dz_target, hopper_cfg,
            seq_len=layout.seq_len, vocab_start=vocab_start, uniform_weight=uniform_weight,
            logit_scale=logit_scale, softcap=softcap,
        )  # fmt: skip
    limits = sparse_limits(e2, c, grad_c, acc_e)

    def chunk_dz(ch: grad_e.Chunk) -> torch.Tensor:  # [N, rows]: the buffer, or dC's free rows
        if ch.dz_at is None:
            return dz_buffer[:, : ch.rows]  # (allocated after the tail's host reads)
        flat = grad_c.view(-1)[ch.dz_at : ch.dz_at + n * ch.dz_cols]
        return flat.view(n, ch.dz_cols)[:, : ch.rows]

    skipped, lead = None, 0
    tail_applies = tail is not None and mode.filter_eps is None and bias is None
    if tail_applies and softcap is None and e2 is not None and _may_sync(c.device):
        # one host read: is the tail thick enough to skip? Queued first, then the exact path's
        # first columns and its dz descriptors, so the GPU has work while the host waits for the
        # forward and resumes (round 21: 0.5-1 ms idle otherwise; either path keeps the columns:
        # the tail's skipping GEMMs pass over their skipped tiles)
        thick = _read_later(tail[0].float().mean() >= MIN_TAIL_SKIPPED)
        first = acc_e.order[0]
        if hopper is not None:
            for ch in (*acc_e.order, *acc_e.recompute):
                if ch.dz_at is not None:
                    hopper_dlogits.prepare(chunk_dz(ch))
        if hopper is not None and min(limits) >= 1.0 and first.dz_at is not None:
            lead = min(first.rows, LEAD_FLOPS // (2 * n * d) // cfg.v * cfg.v)
            if lead:
                hopper_dlogits(first.begin, chunk_dz(first)[:, :lead])
        if thick():
            skipped = _skipped_tail(
                tail, e2, c, y_local, owned, lse, g_nll, g_lse, mode=mode,
                uniform_weight=uniform_weight, logit_scale=logit_scale,
            )  # fmt: skip
    if skipped is not None:
        plan, hopper = skipped.plan, None
    # whole tiles wide (at most the chunk): a 16-byte row stride TMA can store to
    buffer_cols = cdiv(acc_e.dz_columns, cfg.v) * cfg.v
    dz_buffer = torch.empty((n, buffer_cols), dtype=c.dtype, device=c.device)
    flagged = filtering or plan is not None  # the dlogits kernel writes per-tile skip flags
    skip = (
        torch.empty((token_blocks, cdiv(widest, cfg.v)), dtype=torch.int8, device=c.device)
        if flagged
        else None
    )
    dbias = (
        torch.empty((token_blocks, widest), dtype=torch.float32, device=c.device)
        if bias is not None
        else None
    )
    bias_arg = bias if bias is not None else c

    def dlogits(v0: int, cl: int, work: ChunkWork, dz: torch.Tensor, flags=None):
        """The chunk's dz from row ``v0`` (``flags``: its tiles' skip flags, default ``skip``)."""
        if cl <= 0:
            return
        if hopper is not None:
            hopper_dlogits(v0, dz)
            return
        flags = skip if flags is None else flags
        _cce_dlogits_kernel[(token_blocks * cdiv(cl, cfg.v),)](
            e_desc if tma else layout.e3,
            c_desc if tma else c,
            bias_arg,
            layout.y2,
            lse,
            g_nll,
            g_lse if g_lse is not None else lse,
            dz_target,
            dz_target32,
            dz,
            flags if flagged else dz,
            plan if plan is not None else dz,
            dbias if dbias is not None else lse,
            n,
            d,
            layout.seq_len,
            v0,
            cl,
            vocab_start,
            layout.e3.stride(0),
            layout.e3.stride(1),
            layout.e3.stride(2),
            c.stride(0),
            c.stride(1),
            bias_arg.stride(0),
            layout.y2.stride(0),
            layout.y2.stride(1),
            dz.stride(0),
            flags.stride(0) if flagged else 0,
            plan.stride(0) if plan is not None else 0,
            dbias.stride(0) if dbias is not None else 0,
            float(logit_scale),
            float(softcap or 1.0),
            float(target_weight),
            float(uniform_weight),
            float(mode.filter_eps or 0.0),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            HAS_GLSE=g_lse is not None,
            FILTER=filtering,
            PLAN=plan is not None,
            # a dense GEMM reads the dropped tiles (the compute-time filter alone keeps them for
            # the gradient it may not filter)
            ZERO_SKIPPED=plan is not None and not (work.sparse_e and work.sparse_c),
            UPCAST=upcast,
            STOCHASTIC=stochastic_dz(c.dtype),
            DITHER_N=DZ_DITHER_N,
            DITHER_V=DZ_DITHER_V,
            DOT_PRECISION=precision,
            BLOCK_N=cfg.n,
            BLOCK_V=cfg.v,
            BLOCK_D=cfg.d,
            SPLIT_ACC=cfg.split_acc,
            SPLIT_EVERY=cfg.split_every,
            EVEN_D=even_d(d, cfg),
            TMA=tma,
            GROUP_N=cfg.group_n,
            num_warps=cfg.warps,
            num_stages=cfg.stages,
        )

    def class_grad(v0: int, cl: int, work: ChunkWork, dz: torch.Tensor):  # dC[chunk] = dz^T @ E
        if not work.live:
            grad_c[v0 : v0 + cl].zero_()
        elif e2d is not None and not work.sparse_c:
            torch.mm(dz.t(), e2d, out=grad_c[v0 : v0 + cl])
        else:
            grad_matmul(
                dz.t(),
                layout.e3,
                grad_c[v0 : v0 + cl].unsqueeze(0),
                mode=STORE,
                blocks=(min(cfg.v, 128), cfg.gemm_n, min(cfg.gemm_k, cfg.n)),
                skip=skip[:, : cdiv(cl, cfg.v)].t() if work.sparse_c else None,
                skip_tile=(cfg.v, cfg.n),
                **gemm,
            )
        if skipped is not None:  # each skipped tile's first-order share (`vpcce.kernels.tail`)
            rows, t0, whole = grad_c[v0 : v0 + cl], v0 // cfg.v, cl // cfg.v
            rows[: whole * cfg.v].view(whole, cfg.v, d).add_(skipped.c_rows[t0 : t0 + whole, None])
            if cl > whole * cfg.v:  # the shard's last, partial tile
                rows[whole * cfg.v :].add_(skipped.c_rows[t0 + whole])

    chunks = acc_e.chunks
    works = dict(zip(chunks, chunk_work(chunks, mode, plan, cfg.v, limits), strict=True))
    order = acc_e.order
    for ch in order:
        v0, cl, work, dz_c = ch.begin, ch.rows, works[ch], chunk_dz(ch)
        if work.live and lead and ch == order[0]:  # its first columns ran before the reads
            tiles = lead // cfg.v
            if plan is not None:  # the tail: those tiles' flags are the plan's
                skip[:, :tiles].copy_(plan[:, v0 // cfg.v : v0 // cfg.v + tiles])
            rest = None if skip is None else skip[:, tiles:]
            dlogits(v0 + lead, cl - lead, work, dz_c[:, lead:], rest)
        elif work.live:
            dlogits(v0, cl, work, dz_c)
        if work.live:
            acc_e.add(
                dz_c,
                c[v0 : v0 + cl],
                skip=skip[:, : cdiv(cl, cfg.v)] if work.sparse_e else None,
                skip_tile=(cfg.n, cfg.v),
                blocks=(min(cfg.n, 128), cfg.gemm_n, min(cfg.gemm_k, cfg.v)),
                gemm=gemm,
            )
        if ch == order[-1]:  # dE is final, once it has the target entries' residuals
            # (16-bit dz only; not where the filter may drop a target's tile from dE)
            if c.element_size() < 4 and not (mode.filter_eps and mode.filter_e_grad):
                acc_e.add_rows(residual, torch.where(owned, y_local, 0), c)
            if skipped is not None:  # the skipped tail, to first order (`vpcce.kernels.tail`)
                acc_e.add_rows(skipped.e_weights, torch.zeros_like(y_local), skipped.c_mean)
            acc_e.finish(grad_e3)
            if grad_e_ready is not None:
                grad_e_ready()
        if not ch.deferred:
            class_grad(v0, cl, work, dz_c)
        if dbias is not None and work.live:
            grad_bias[v0 : v0 + cl] = dbias[:, :cl].sum(dim=0)  # fixed-order reduction
        elif dbias is not None:
            grad_bias[v0 : v0 + cl] = 0
    # the rows whose dC memory held the dE scratch (`grad_e.scratch_passes`)
    for ch in acc_e.recompute:
        v0, cl, work, dz_c = ch.begin, ch.rows, works[ch], chunk_dz(ch)
        if ch != acc_e.live and work.live:
            dlogits(v0, cl, work, dz_c)
        class_grad(v0, cl, work, dz_c)
    return grad_c, grad_bias
