"""Warp-specialized forward for Hopper (Gluon): the tensor cores don't wait for the softmax.

Same contract as `vpcce.kernels.forward` (per-split ``[S, N, 6]`` partials, merged in split order;
optional per-tile max summary), different schedule. Round 11 (docs/perf.md) found the Triton
forward's tensor pipe busy 42% of the time: every warp ran its tile's MMAs, then the tile's
softmax statistics, while nothing else issued MMAs. Here a program is three partitions:

- a producer warp streams ``E[128 rows, 64]`` and ``C[256 vocab rows, 64]`` K-slices into a
  4-slot ring of shared memory through TMA, one ``ready`` / ``empty`` mbarrier pair per
  accumulation chain of 2 slots;
- two consumer warpgroups (240 registers each) own 64 of the 128 token rows each and read the
  same ``C`` slices. Each runs its wgmmas, then its epilogue; while one is in its epilogue the
  other's wgmmas keep the tensor cores busy (they drift apart by up to the ring's depth). A row
  lives in one warp of the wgmma layout, so the row max / sum are warp shuffles: no
  shared-memory exchange and no CTA barrier, unlike the 64 x 256 Triton tile.

Programs run in a grouped order (`GROUP` token blocks share a wave) and `num_splits` picks the
vocabulary splits. The epilogue computes only the columns the caller reads (``STATS``,
``SUM_Z``), and not the target logit, which `launch` takes from `vpcce.kernels.target_logit`
(the same value, bit for bit): the loss needs ~5.6 instructions per logit, the entropy and
argmax three times that. H100 (docs/perf.md, rounds 12, 14, 17 and 18): Gemma 24.9 -> 14.0
ms (1.06 x the cuBLAS GEMM) and 0.38 ms less in round 18; Llama 45.0 -> 25.2 ms (1.07 x) and
0.22 ms less (every column: 15.5 and 27-31 ms before round 18).

Accuracy follows the Triton forward's split accumulation (Hopper's accumulator chain truncates,
round 2): every chain of ``SPLIT`` 64-wide K steps starts from zero (``use_acc=False``) and is
added into the fp32 accumulator with an IEEE add. The 64 x 256 accumulator is kept as two
64 x 128 halves so that a chain's partial product needs 64 registers, not 128.

GPU-only (Gluon has no interpreter); `supported` says when `vpcce.kernels.forward` uses it.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from vpcce.kernels.common import Blocks, cdiv, tma_addressable
from vpcce.kernels.target_logit import target_logits
from vpcce.partials import ZTARGET

# Gluon is experimental and its API moves (Triton 3.9 renamed the TMA copies these kernels call):
# they run only on the Triton minor versions they were validated with, else the Triton kernels do
VALIDATED_TRITON = ((3, 6),)
CONSUMER_REGS = 240  # per thread, each consumer warpgroup (setmaxnreg)
PRODUCER_REGS = 24
GROUP = 16  # token blocks that run together (see the kernel's program order)
_ROWS = 64  # token rows per consumer warpgroup (the wgmma M)
_WG0 = gl.constexpr(0)  # consumer warpgroup ids: which 64 of the 128 rows
_WG1 = gl.constexpr(1)


@gluon.jit
def _tanh(x):
    t = gl.exp(-2.0 * gl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return gl.where(x < 0, -y, y)


@gluon.jit
def _load_step(e_desc, c_desc, e_bufs, c_bufs, ready, empty, i, n0, c_row, k0):
    """Ring step ``i``: the ``E[n0:, k0]`` and ``C[c_row:, k0]`` slices into slot ``i % stages``.

    The ring has ``stages`` K-step slots and one ``ready`` / ``empty`` mbarrier pair per group of
    ``stages / len(ready)`` consecutive slots (a consumer's accumulation chain): fewer barriers,
    and each costs the consumer warpgroups a named barrier (round 14). A group's first step waits
    for it to be free and sets the bytes its ready barrier expects.
    """
    stages: gl.constexpr = e_bufs.type.shape[0]
    groups: gl.constexpr = ready.type.shape[0]
    per_group: gl.constexpr = stages // groups
    nbytes: gl.constexpr = per_group * (e_desc.block_type.nbytes + c_desc.block_type.nbytes)
    g = (i // per_group) % groups
    first = i % per_group == 0
    # a fresh mbarrier counts as past phase 1: the first round finds every group free
    mbarrier.wait(empty.index(g), (((i // per_group) // groups) & 1) ^ 1, pred=first)
    mbarrier.expect(ready.index(g), nbytes, pred=first)
    tma.async_copy_global_to_shared(e_desc, [n0, k0], ready.index(g), e_bufs.index(i % stages))
    tma.async_copy_global_to_shared(c_desc, [c_row, k0], ready.index(g), c_bufs.index(i % stages))


@gluon.jit
def _producer(e_desc, c_desc, e_bufs, c_bufs, ready, empty, n0, t_begin, t_end, num_k):
    """Stream ``E[n0:, k]`` and ``C[t * block_v:, k]`` slices into the ring (`_load_step`), tile
    by tile."""
    block_d: gl.constexpr = e_desc.block_type.shape[1]
    block_v: gl.constexpr = c_desc.block_type.shape[0]
    i = 0
    for t in range(t_begin, t_end):
        for k in range(num_k):
            _load_step(e_desc, c_desc, e_bufs, c_bufs, ready, empty, i, n0, t * block_v,
                       k * block_d)  # fmt: skip
            i += 1


@gluon.jit
def _exp2(x):
    # flush-to-zero: no denormal range fix-up around the MUFU (2^-126 is far below what s can see)
    return gl.inline_asm_elementwise(
        "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1
    )


@gluon.jit
def _finish_logits(
    acc,
    cols,
    v0,
    V,
    bias_ptr,
    stride_bias,
    logit_scale,
    softcap,
    HAS_BIAS: gl.constexpr,
    HAS_SCALE: gl.constexpr,
    HAS_SOFTCAP: gl.constexpr,
):
    """The Triton `logits_tile`'s tail for columns ``v0 + cols``: bias, scale, softcap.

    Columns past V come out exactly 0 (TMA zero-fills their operands, their bias loads as 0):
    the caller sums them as they are and masks them to -inf only in the last tile. Columns are
    int32 offsets within the tile (constants in registers), not int64 ids.
    """
    if HAS_BIAS:
        b = gl.load(
            bias_ptr + (v0 + cols).to(gl.int64) * stride_bias, mask=cols < V - v0, other=0.0
        )
        acc = acc + b.to(gl.float32)[None, :]
    if HAS_SCALE:  # a scale of 1 leaves every value as it is: skip the multiply
        acc = acc * logit_scale
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@gluon.jit
def _first_max(z, cols):
    """Per row, the half tile's (NaN-highest) maximum and the first column holding it (as
    torch.argmax)."""
    r = gl.where(z != z, float("inf"), z)
    r_max = gl.max(r, axis=1)
    none: gl.constexpr = 2**31 - 1
    return r_max, gl.min(gl.where(r == r_max[:, None], cols[None, :], none), axis=1)


@gluon.jit
def _add_half(z, m_ref, s_sum, x_log2, STATS: gl.constexpr):
    """Add a half tile to the running sums (rescaled to ``m_ref``).

    In base 2: ``t = (z - m_ref) log2 e`` (subtracting first: an FFMA against a rounded
    ``m_ref log2 e`` would shift every ``t`` by up to ``|m| 6e-8``), ``p = 2^t``, and ``x``
    (with ``STATS``) accumulates ``p t`` (the caller multiplies by ln 2). ``max(t, -256)`` keeps
    ``0 * -inf`` (p = 0 at z = -inf) out of ``x`` while NaN still propagates (``p`` is NaN then).
    """
    t = (z - m_ref[:, None]) * 1.4426950408889634
    p = _exp2(t)
    s_sum += gl.sum(p, axis=1)
    if STATS:
        x_log2 += gl.sum(p * gl.maximum(t, -256.0), axis=1)
    return s_sum, x_log2


@gluon.jit
def _chain(e_bufs, c_bufs, i, col0, after, WG: gl.constexpr, rows: gl.constexpr,
           width: gl.constexpr, SPLIT: gl.constexpr):  # fmt: skip
    """``E[rows of WG] @ C[col0:col0 + width].T`` over the ring slots ``i .. i + SPLIT - 1``: one
    wgmma chain from zero, waited for. ``after`` (ignored as an accumulator, ``use_acc=False``)
    is the value the chain must follow: passing the previous add's result keeps the compiler
    from hoisting these wgmmas above that add (two live partials would spill, round 12)."""
    stages: gl.constexpr = e_bufs.type.shape[0]
    part = after
    for j in gl.static_range(SPLIT):
        st = (i + j) % stages
        a = e_bufs.index(st).slice(WG * rows, rows)
        b = c_bufs.index(st).slice(col0, width).permute((1, 0))
        part = warpgroup_mma(a, b, part, use_acc=j > 0, is_async=True)
    return warpgroup_mma_wait(0, deps=(part,))


@gluon.jit
def _consumer(ops, WG: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_SCALE: gl.constexpr,
              HAS_SOFTCAP: gl.constexpr, SUMMARY: gl.constexpr, SUMMARY_LSE: gl.constexpr,
              STATS: gl.constexpr, SUM_Z: gl.constexpr, SPLIT: gl.constexpr):  # fmt: skip
    """Consumer warpgroup ``WG``: rows ``n0 + 64 WG ...`` of the program's tiles; ``ops`` are the
    kernel's buffers, barriers, pointers and scalars (a tuple: one list for both warpgroups)."""
    (e_bufs, c_bufs, ready, empty, bias_ptr, part_ptr, part_int_ptr, tile_max_ptr, N, V,
     vocab_start, n0, pid_s, t_begin, t_end, num_k, stride_ps, stride_tmt, stride_bias,
     logit_scale, softcap) = ops  # fmt: skip
    groups: gl.constexpr = ready.type.shape[0]
    rows: gl.constexpr = e_bufs.type.shape[1] // 2
    half: gl.constexpr = c_bufs.type.shape[1] // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, half, 16]
    )
    row_layout: gl.constexpr = gl.SliceLayout(1, mma)
    col_layout: gl.constexpr = gl.SliceLayout(0, mma)

    n = n0 + WG * rows + gl.arange(0, rows, layout=row_layout)
    n_mask = n < N
    n64 = n.to(gl.int64)
    cols = gl.arange(0, half, layout=col_layout)

    m = gl.full([rows], float("-inf"), gl.float32, row_layout)
    s_sum = gl.zeros([rows], gl.float32, row_layout)
    x = gl.zeros([rows], gl.float32, row_layout)
    sum_z = gl.zeros([rows], gl.float32, row_layout)
    arg = gl.zeros([rows], gl.int32, row_layout)
    i = 0
    for t in range(t_begin, t_end):
        acc_lo = gl.zeros([rows, half], gl.float32, mma)
        acc_hi = gl.zeros([rows, half], gl.float32, mma)
        for _ in range(0, num_k, SPLIT):
            # per half, a fresh wgmma chain over SPLIT K steps, rounded into the fp32 accumulator
            # by an IEEE add (split accumulation); one mbarrier pair covers the chain's ring slots
            g = (i // SPLIT) % groups
            mbarrier.wait(ready.index(g), ((i // SPLIT) // groups) & 1)
            part = _chain(e_bufs, c_bufs, i, 0, acc_hi, WG, rows, half, SPLIT)
            acc_lo = acc_lo + part
            part = _chain(e_bufs, c_bufs, i, half, acc_lo, WG, rows, half, SPLIT)
            acc_hi = acc_hi + part
            mbarrier.arrive(empty.index(g), count=1)
            i += SPLIT

        # the statistics of `vpcce.kernels.forward`, over the tile's two halves
        v_lo = t * (2 * half)
        v_hi = v_lo + half
        z_lo = _finish_logits(acc_lo, cols, v_lo, V, bias_ptr, stride_bias, logit_scale,
                              softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)  # fmt: skip
        z_hi = _finish_logits(acc_hi, cols, v_hi, V, bias_ptr, stride_bias, logit_scale,
                              softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)  # fmt: skip
        if SUM_Z:
            sum_z += gl.sum(z_lo, axis=1) + gl.sum(z_hi, axis=1)  # columns past V are 0 here
        if v_hi + half > V:  # the last tile: columns past V weigh exp(-inf) = 0 from here on
            z_lo = gl.where((cols < V - v_lo)[None, :], z_lo, float("-inf"))
            z_hi = gl.where((cols < V - v_hi)[None, :], z_hi, float("-inf"))
        tile_max = gl.maximum(gl.max(z_lo, axis=1), gl.max(z_hi, axis=1))
        if SUMMARY and not SUMMARY_LSE:
            gl.store(
                tile_max_ptr + t * stride_tmt + n,
                tile_max.to(tile_max_ptr.dtype.element_ty),
                mask=n_mask,
            )
        if STATS:
            r_lo, arg_lo = _first_max(z_lo, cols)
            r_hi, arg_hi = _first_max(z_hi, cols)
            tile_arg = gl.where(r_hi > r_lo, arg_hi + v_hi, arg_lo + v_lo)
            arg = gl.where(tile_max > m, tile_arg, arg)  # strict: an earlier tile keeps a tie
        m_new = gl.maximum(m, tile_max)
        # -inf logits weigh 0; while every logit so far is -inf, shift by 0 (no (-inf) - (-inf))
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp(m - m_ref)
        if STATS:
            delta = gl.where(s_sum > 0, m - m_ref, 0.0)  # m = -inf while s = 0: avoid -inf * 0
            x = alpha * (x + delta * s_sum)
        s_sum = s_sum * alpha
        s_tile = gl.zeros_like(s_sum)
        x_tile = gl.zeros_like(x)
        s_tile, x_tile = _add_half(z_lo, m_ref, s_tile, x_tile, STATS)
        s_tile, x_tile = _add_half(z_hi, m_ref, s_tile, x_tile, STATS)
        s_sum += s_tile
        if SUMMARY and SUMMARY_LSE:  # the tile's log-sum-exp (`vpcce.kernels.forward`)
            gl.store(tile_max_ptr + t * stride_tmt + n, m_ref + gl.log(s_tile), mask=n_mask)
        if STATS:
            x += x_tile * 0.6931471805599453  # back to natural log units
        m = m_new

    out = part_ptr + stride_ps * pid_s + n64 * 6
    gl.store(out + 0, m, mask=n_mask)
    gl.store(out + 1, s_sum, mask=n_mask)
    gl.store(out + 2, x, mask=n_mask)
    gl.store(out + 3, sum_z, mask=n_mask)
    gl.store(out + 4, gl.zeros_like(sum_z), mask=n_mask)  # ZTARGET: `launch` fills split 0's
    out_int = part_int_ptr + stride_ps * pid_s + n64 * 6
    gl.store(out_int + 5, arg + vocab_start, mask=n_mask)


@gluon.jit
def _ring(e_desc, c_desc, STAGES: gl.constexpr, GROUPS: gl.constexpr):
    """Shared memory of the producer / consumer ring: ``STAGES`` K-step slots of ``E`` and ``C``
    tiles, and one ``ready`` / ``empty`` mbarrier pair per group of ``STAGES / GROUPS`` slots."""
    e_shape: gl.constexpr = [STAGES] + e_desc.block_type.shape
    c_shape: gl.constexpr = [STAGES] + c_desc.block_type.shape
    e_bufs = gl.allocate_shared_memory(e_desc.dtype, e_shape, e_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, c_shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [GROUPS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [GROUPS, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(GROUPS):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups release a group
    return e_bufs, c_bufs, ready, empty


@gluon.jit
def _grouped(w, per_block, num_blocks, GROUP: gl.constexpr):
    """Index ``w`` of ``num_blocks`` token blocks x ``per_block`` (splits or tiles), in grouped
    order: its token block and its index within the block. Consecutive ``w`` walk GROUP token
    blocks first, so the ones running at one time share those blocks' rows of E in L2 while they
    stream classifier tiles (Llama's E is 134 MB, beyond L2)."""
    group_size = GROUP * per_block
    first_block = (w // group_size) * GROUP
    blocks_in_group = gl.minimum(num_blocks - first_block, GROUP)
    r = w % group_size
    return first_block + r % blocks_in_group, r // blocks_in_group


@gluon.jit
def _program_tiles(N, block_n: gl.constexpr, num_tiles, num_splits, tiles_per_split,
                   GROUP: gl.constexpr):  # fmt: skip
    """This program's first token row, split, and vocabulary tiles ``[t_begin, t_end)``, the
    programs in grouped order (`_grouped`)."""
    pid_n, pid_s = _grouped(gl.program_id(0), num_splits, gl.cdiv(N, block_n), GROUP)
    t_begin = pid_s * tiles_per_split
    return pid_n * block_n, pid_s, t_begin, gl.minimum(t_begin + tiles_per_split, num_tiles)


@gluon.jit
def _cce_fwd_ws_kernel(
    e_desc,
    c_desc,
    bias_ptr,
    part_ptr,
    part_int_ptr,
    tile_max_ptr,
    N,
    V,
    D,
    vocab_start,
    num_splits,
    tiles_per_split,
    stride_ps,
    stride_tmt,
    stride_bias,
    logit_scale,
    softcap,
    HAS_BIAS: gl.constexpr,
    HAS_SCALE: gl.constexpr,
    HAS_SOFTCAP: gl.constexpr,
    SUMMARY: gl.constexpr,
    SUMMARY_LSE: gl.constexpr,
    STATS: gl.constexpr,
    SUM_Z: gl.constexpr,
    STAGES: gl.constexpr,
    SPLIT: gl.constexpr,
    GROUP: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    block_n: gl.constexpr = e_desc.block_type.shape[0]
    block_d: gl.constexpr = e_desc.block_type.shape[1]
    block_v: gl.constexpr = c_desc.block_type.shape[0]
    gl.static_assert(STAGES % SPLIT == 0, "a chain's K steps share one mbarrier pair")
    e_bufs, c_bufs, ready, empty = _ring(e_desc, c_desc, STAGES, STAGES // SPLIT)
    n0, pid_s, t_begin, t_end = _program_tiles(
        N, block_n, gl.cdiv(V, block_v), num_splits, tiles_per_split, GROUP
    )
    # K steps, rounded up to whole SPLIT chains: TMA zero-fills the steps past D
    num_k = gl.cdiv(gl.cdiv(D, block_d), SPLIT) * SPLIT
    ops = (e_bufs, c_bufs, ready, empty, bias_ptr, part_ptr, part_int_ptr, tile_max_ptr, N, V,
           vocab_start, n0, pid_s, t_begin, t_end, num_k, stride_ps, stride_tmt, stride_bias,
           logit_scale, softcap)  # fmt: skip
    gl.warp_specialize(
        [
            (_consumer, (ops, _WG0, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP, SUMMARY, SUMMARY_LSE,
                         STATS, SUM_Z, SPLIT)),
            (_consumer, (ops, _WG1, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP, SUMMARY, SUMMARY_LSE,
                         STATS, SUM_Z, SPLIT)),
            (
                _producer,
                (e_desc, c_desc, e_bufs, c_bufs, ready, empty, n0, t_begin, t_end, num_k),
            ),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )  # fmt: skip


@functools.cache
def gluon_validated(version: str = triton.__version__) -> bool:
    """True when this Triton's Gluon API is one these kernels were validated with."""
    major, minor = (int(x) for x in version.split(".")[:2])
    return (major, minor) in VALIDATED_TRITON


def supported(e2: torch.Tensor | None, c: torch.Tensor, cfg: Blocks) -> bool:
    """True when this kernel can run: a Hopper GPU and 16-bit operands that TMA reads as plain
    matrices (``e2`` is None for hidden states that are not one ``[N, D]`` matrix view)."""
    if e2 is None or c.device.type != "cuda" or not gluon_validated():
        return False
    if device_major(c.device.index) != 9:
        return False
    if c.dtype not in (torch.bfloat16, torch.float16) or e2.dtype != c.dtype or cfg.n != 2 * _ROWS:
        return False
    return tma_addressable(e2) and tma_addressable(c)


@functools.cache
def device_major(index: int | None) -> int:
    """The compute capability's major version of a CUDA device (cached: the launches ask it on
    every call)."""
    return torch.cuda.get_device_capability(index)[0]


@functools.cache
def shared_layout(block: tuple[int, int], dtype: torch.dtype):
    """The NVMMA shared layout of a ``block`` tile of 16-bit ``dtype`` elements, built once (its
    construction is host time before every launch; round 22)."""
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


def operand_descriptors(e2: torch.Tensor, c: torch.Tensor, cfg: Blocks):
    """Gluon TMA descriptors of ``E [N, D]`` and ``C [V, D]`` in the ring's tiles."""
    return tuple(
        TensorDescriptor.from_tensor(x, list(block), shared_layout(block, c.dtype))
        for x, block in ((e2, (cfg.n, cfg.d)), (c, (cfg.v, cfg.d)))
    )


@functools.cache
def num_splits(num_tokens: int, num_vocab_tiles: int, cfg: Blocks, sms: int) -> int:
    """Vocabulary splits for one program per SM (the ring takes 192 KB of shared memory).

    Every program does the same work, so the time goes as waves x (tiles per split + ~1 tile of
    start-up and epilogue). At least ``SMs / GROUP`` splits, so that a wave holds at most about
    GROUP token blocks; at most 32, so the ``[splits, N, 6]`` partials stay small (Gemma: 10
    splits, 4.85 waves; Llama: 9 splits, 8.7 waves)."""
    blocks = cdiv(num_tokens, cfg.n)
    lowest = min(cdiv(sms, GROUP), num_vocab_tiles)
    candidates = range(lowest, max(lowest, min(num_vocab_tiles, 32)) + 1)
    return min(
        candidates,
        key=lambda s: (cdiv(blocks * s, sms) * (cdiv(num_vocab_tiles, s) + 1), s),
    )


def launch(
    e2,
    c,
    bias,
    y2,
    parts,
    tile_max,
    cfg: Blocks,
    *,
    seq_len,
    vocab_start,
    tiles_per_split,
    logit_scale,
    softcap,
    stats=True,
    sum_z=True,
):
    """Fill ``parts`` ([S, N, 6]) with the per-split partials (grid: token blocks x S); the
    ZTARGET column holds the whole shard's target logit in split 0 (`target_logit`), 0 in the
    others.

    ``stats=False`` skips the XLOGX and ARGMAX columns, ``sum_z=False`` the SUMZ column (see
    `vpcce.kernels.forward.forward_partials`).
    """
    n, (v, d) = e2.shape[0], c.shape
    e_desc, c_desc = operand_descriptors(e2, c, cfg)
    bias_arg = bias if bias is not None else c
    splits = parts.shape[0]
    _cce_fwd_ws_kernel[(cdiv(n, cfg.n) * splits,)](
        e_desc,
        c_desc,
        bias_arg,
        parts,
        parts.view(torch.int32),
        tile_max if tile_max is not None else parts,
        n,
        v,
        d,
        vocab_start,
        splits,
        tiles_per_split,
        parts.stride(0),
        tile_max.stride(0) if tile_max is not None else 0,
        bias_arg.stride(0),
        float(logit_scale),
        float(softcap or 1.0),
        HAS_BIAS=bias is not None,
        HAS_SCALE=logit_scale != 1.0,
        HAS_SOFTCAP=softcap is not None,
        SUMMARY=tile_max is not None,
        # an fp32 summary holds each tile's log-sum-exp, a 16-bit one its max logit
        SUMMARY_LSE=tile_max is not None and tile_max.dtype == torch.float32,
        STATS=stats,
        SUM_Z=sum_z,
        STAGES=cfg.stages,
        SPLIT=cfg.split_every,
        GROUP=GROUP,
        CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS,
        num_warps=4,
        # 3 warpgroups (2 consumers, the producer's) share the register file: 65536 / 384 threads
        maxnreg=168,
    )
    target_logits(
        e2, c, bias, y2, parts[0, :, ZTARGET], seq_len=seq_len, vocab_start=vocab_start,
        logit_scale=logit_scale, softcap=softcap, block_d=cfg.d, split=cfg.split_every,
    )  # fmt: skip
