"""Warp-specialized dlogits for Hopper (Gluon): the exact backward's recompute at tensor-core speed.

Same contract as `vpcce.kernels.backward`'s ``_cce_dlogits_kernel`` for the exact mode without a
bias (no filter flags, no plan, no bias column sums): ``dz[:, j] = dL/dz`` of vocabulary row
``chunk_begin + j`` for every token, in the input dtype. Round 11 (docs/perf.md) found the Triton
kernel at 67% tensor-pipe use with 14k register spills per chunk. Here, as in
`vpcce.kernels.forward_hopper`, a producer warp streams ``E`` and ``C`` K-slices through a TMA
ring and two consumer warpgroups own 64 of an item's 128 token rows each. The logits only need
~1e-5 relative accuracy here (``dz`` is rounded to 16 bits and ``p`` uses the forward's LSE), so
each 64 x 256 tile accumulates in one wgmma chain (128 registers, no split accumulation). Each
warpgroup writes its ``dz`` tile through shared memory and a TMA store, which clips the chunk's
last columns and the last token rows.

The grid is persistent: one program per SM walks every SMs-th (token block, vocabulary tile)
item of the chunk, so the ring runs on from one item to the next (the producer loads the next
item's slices during the epilogue) and no program starts or drains per token block. A chunk is
often 7 tiles wide, which gave one tile per program before (round 28: on one chunk at the Llama
head, 1.11-1.12 -> 1.05-1.06 x the GEMM of the chunk's shape).

GPU-only (Gluon has no interpreter); `supported` says when the backward uses it.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from vpcce.kernels.common import (
    DZ_DITHER_N,
    DZ_DITHER_V,
    Blocks,
    cdiv,
    stochastic_dz,
)
from vpcce.kernels.forward_hopper import (
    _ROWS,
    _WG0,
    _WG1,
    CONSUMER_REGS,
    GROUP,
    PRODUCER_REGS,
    _exp2,
    _finish_logits,
    _grouped,
    _load_step,
    _ring,
    operand_descriptors,
    shared_layout,
)
from vpcce.kernels.forward_hopper import supported as forward_supported  # the same operand rule


@gluon.jit
def _item(w, num_tiles, num_blocks, block_n: gl.constexpr, GROUP: gl.constexpr):
    """Work item ``w`` of a chunk: its first token row and vocabulary tile. In grouped order
    (`forward_hopper._grouped`), the items in flight (one per program, consecutive) cover GROUP
    token blocks and a few tiles, whose rows of E and C stay in L2."""
    block, t = _grouped(w, num_tiles, num_blocks, GROUP)
    return block * block_n, t


@gluon.jit
def _dlogits_producer(e_desc, c_desc, e_bufs, c_bufs, ready, empty, num_tiles, num_blocks, num_k,
                      v0, GROUP: gl.constexpr):  # fmt: skip
    """Stream each item's ``E[n0:, k]`` and ``C[v0 + t * block_v:, k]`` slices into the ring
    (`forward_hopper._load_step`; here one ready / empty mbarrier pair per slot)."""
    block_n: gl.constexpr = e_desc.block_type.shape[0]
    block_d: gl.constexpr = e_desc.block_type.shape[1]
    block_v: gl.constexpr = c_desc.block_type.shape[0]
    i = 0
    for w in range(gl.program_id(0), num_blocks * num_tiles, gl.num_programs(0)):
        n0, t = _item(w, num_tiles, num_blocks, block_n, GROUP)
        for k in range(num_k):
            _load_step(e_desc, c_desc, e_bufs, c_bufs, ready, empty, i, n0, v0 + t * block_v,
                       k * block_d)  # fmt: skip
            i += 1


@gluon.jit
def _dlogits_consumer(ops, WG: gl.constexpr, HAS_SCALE: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                      HAS_GLSE: gl.constexpr, STOCHASTIC: gl.constexpr, DITHER_N: gl.constexpr,
                      DITHER_V: gl.constexpr, GROUP: gl.constexpr):  # fmt: skip
    """Consumer warpgroup ``WG``: the ``dz`` of rows ``n0 + 64 WG ...`` for the program's items;
    ``ops`` are the kernel's buffers, barriers, pointers and scalars."""
    (e_bufs, c_bufs, dz_bufs, ready, empty, dz_desc, y_ptr, lse_ptr, g_nll_ptr, g_lse_ptr,
     dzt_ptr, N, seq_len, vocab_start, chunk_begin, chunk_len, num_tiles, num_blocks, num_k,
     stride_yb, stride_yt, logit_scale, softcap, uniform_weight) = ops  # fmt: skip
    stages: gl.constexpr = e_bufs.type.shape[0]
    rows: gl.constexpr = e_bufs.type.shape[1] // 2
    cols_n: gl.constexpr = c_bufs.type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, cols_n, 16]
    )
    row_layout: gl.constexpr = gl.SliceLayout(1, mma)
    col_layout: gl.constexpr = gl.SliceLayout(0, mma)
    dz_smem = dz_bufs.index(WG)
    cols = gl.arange(0, cols_n, layout=col_layout)

    i = 0
    for w in range(gl.program_id(0), num_blocks * num_tiles, gl.num_programs(0)):
        n0, t = _item(w, num_tiles, num_blocks, 2 * rows, GROUP)
        n = n0 + WG * rows + gl.arange(0, rows, layout=row_layout)
        n_mask = n < N
        n64 = n.to(gl.int64)
        y = gl.load(
            y_ptr + (n64 // seq_len) * stride_yb + (n64 % seq_len) * stride_yt, mask=n_mask,
            other=-1,
        )  # fmt: skip
        lse = gl.load(lse_ptr + n, mask=n_mask, other=0.0)
        g = gl.load(g_nll_ptr + n, mask=n_mask, other=0.0)
        g_p = g
        if HAS_GLSE:
            g_p = g + gl.load(g_lse_ptr + n, mask=n_mask, other=0.0)
        # the target column's dz, from the forward's target logit (`vpcce.kernels.target_dz`):
        # this kernel's one-chain logit is ~1e-5 off, which p_y - 1 would amplify
        dz_target = gl.load(dzt_ptr + n, mask=n_mask, other=0.0).to(gl.float32)

        acc = gl.zeros([rows, cols_n], gl.float32, mma)
        for k in range(num_k):
            st = i % stages
            mbarrier.wait(ready.index(st), (i // stages) & 1)
            acc = warpgroup_mma(
                e_bufs.index(st).slice(WG * rows, rows),
                c_bufs.index(st).permute((1, 0)),
                acc,
                use_acc=k > 0,
                is_async=True,
            )
            # the previous step's wgmma is done: its stage goes back to the producer
            acc = warpgroup_mma_wait(1, deps=(acc,))
            mbarrier.arrive(empty.index((i + stages - 1) % stages), count=1, pred=k > 0)
            i += 1
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((i + stages - 1) % stages), count=1)

        # dz = (g + g_lse) p - g uniform_weight, times the softcap and scale derivatives (the
        # Triton kernel's epilogue, in base 2 for the exp); the target's column from dz_target
        j0 = t * cols_n
        # (no bias here: `acc` stands in for the unused bias pointer)
        z = _finish_logits(
            acc, cols, chunk_begin + j0, chunk_begin + chunk_len, acc, 0, logit_scale, softcap,
            False, HAS_SCALE, HAS_SOFTCAP,
        )  # fmt: skip
        # one FFMA against a rounded lse log2 e: p is off by ~|lse| 6e-8 relative, far below the
        # bf16 rounding of dz
        p = _exp2(z * 1.4426950408889634 - (lse * 1.4426950408889634)[:, None])
        y_col = y.to(gl.int64) - vocab_start - (chunk_begin + j0)
        y_col = gl.where((y_col >= 0) & (y_col < cols_n), y_col, -1).to(gl.int32)
        # an FFMA for every column (fewer instructions per element than forming q: round 17);
        # g uniform_weight: every column's share of the target term
        dz = g_p[:, None] * p - (g * uniform_weight)[:, None]
        if HAS_SOFTCAP:
            tz = z / softcap
            dz = dz * (1.0 - tz * tz)
        if HAS_SCALE:
            dz = dz * logit_scale
        dz = gl.where(cols[None, :] == y_col[:, None], dz_target[:, None], dz)
        if STOCHASTIC:  # bf16 (`common.STOCHASTIC_DZ`): a dither, then truncation
            dither_rows = n.to(gl.uint32) * DITHER_N  # the dither lattice's token term
            dither_cols = (vocab_start + chunk_begin + j0 + cols).to(gl.uint32) * DITHER_V
            lattice = dither_rows[:, None] + dither_cols[None, :]
            bits = dz.to(gl.uint32, bitcast=True) + (lattice >> 16)
            rounded = (bits & 0xFFFF0000).to(gl.float32, bitcast=True)  # exact in bf16
            dz = gl.where(dz == dz, rounded, dz)  # NaN's bits would carry into the sign
        tma.store_wait(0)  # this warpgroup's previous tile has left shared memory
        dz_smem.store(dz.to(dz_smem.dtype))
        fence_async_shared()
        # TMA clips the columns past the chunk and the rows past N
        tma.async_copy_shared_to_global(dz_desc, [n0 + WG * rows, j0], dz_smem)
    tma.store_wait(0)


@gluon.jit
def _cce_dlogits_ws_kernel(
    e_desc, c_desc, dz_desc, y_ptr, lse_ptr, g_nll_ptr, g_lse_ptr, dzt_ptr,
    N, D, seq_len, vocab_start, chunk_begin, chunk_len,
    stride_yb, stride_yt, logit_scale, softcap, uniform_weight,
    HAS_SCALE: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_GLSE: gl.constexpr,
    STOCHASTIC: gl.constexpr, DITHER_N: gl.constexpr, DITHER_V: gl.constexpr,
    STAGES: gl.constexpr,
    GROUP: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):  # fmt: skip
    block_n: gl.constexpr = e_desc.block_type.shape[0]
    block_d: gl.constexpr = e_desc.block_type.shape[1]
    block_v: gl.constexpr = c_desc.block_type.shape[0]
    e_bufs, c_bufs, ready, empty = _ring(e_desc, c_desc, STAGES, STAGES)
    dz_shape: gl.constexpr = [2] + dz_desc.block_type.shape  # one store buffer per warpgroup
    dz_bufs = gl.allocate_shared_memory(dz_desc.dtype, dz_shape, dz_desc.layout)
    num_tiles = gl.cdiv(chunk_len, block_v)
    num_blocks = gl.cdiv(N, block_n)
    num_k = gl.cdiv(D, block_d)
    ops = (e_bufs, c_bufs, dz_bufs, ready, empty, dz_desc, y_ptr, lse_ptr, g_nll_ptr, g_lse_ptr,
           dzt_ptr, N, seq_len, vocab_start, chunk_begin, chunk_len, num_tiles, num_blocks,
           num_k, stride_yb, stride_yt, logit_scale, softcap, uniform_weight)  # fmt: skip
    gl.warp_specialize(
        [
            (_dlogits_consumer,
             (ops, _WG0, HAS_SCALE, HAS_SOFTCAP, HAS_GLSE, STOCHASTIC, DITHER_N, DITHER_V, GROUP)),
            (_dlogits_consumer,
             (ops, _WG1, HAS_SCALE, HAS_SOFTCAP, HAS_GLSE, STOCHASTIC, DITHER_N, DITHER_V, GROUP)),
            (
                _dlogits_producer,
                (e_desc, c_desc, e_bufs, c_bufs, ready, empty, num_tiles, num_blocks, num_k,
                 chunk_begin, GROUP),
            ),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )  # fmt: skip


def supported(e2: torch.Tensor | None, c: torch.Tensor, cfg: Blocks | None) -> bool:
    """True where the forward's kernel takes ``e2`` and ``c`` (`forward_hopper.supported`); the
    caller's ``dz`` views must be TMA-addressable (`vpcce.kernels.backward`'s are by
    construction)."""
    return cfg is not None and forward_supported(e2, c, cfg)


def launcher(e2, c, y2, lse, g_nll, g_lse, dz_target, cfg: Blocks, *, seq_len, vocab_start,
             uniform_weight, logit_scale, softcap):  # fmt: skip
    """``dlogits(chunk_begin, dz)``: write the ``[N, rows]`` ``dz`` of the chunk from that row
    (``dlogits.prepare(dz)`` builds a view's descriptor ahead of its launch).

    ``dz_target`` ``[N]``: the target column's dz (`vpcce.kernels.target_dz`). The operands'
    TMA descriptors and the launch arguments are built once per backward, not per chunk (a
    backward launches 20–90 chunks).
    """
    n, d = e2.shape
    e_desc, c_desc = operand_descriptors(e2, c, cfg)
    dz_layout = shared_layout((_ROWS, cfg.v), c.dtype)
    sms = torch.cuda.get_device_properties(c.device).multi_processor_count
    scalars = (logit_scale, softcap or 1.0, uniform_weight)
    scalars = tuple(float(x) for x in scalars)
    flags = dict(
        HAS_SCALE=logit_scale != 1.0, HAS_SOFTCAP=softcap is not None, HAS_GLSE=g_lse is not None,
        STOCHASTIC=stochastic_dz(c.dtype), DITHER_N=DZ_DITHER_N, DITHER_V=DZ_DITHER_V,
        STAGES=cfg.stages,
        GROUP=GROUP, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=4, maxnreg=168,
    )  # fmt: skip
    dz_descs = {}  # a few dz views recur (the buffer's chunk lengths): build each once

    def prepare(dz: torch.Tensor):
        """The TMA descriptor of a ``dz`` view, built once (a new view cost ~0.2 ms more
        host time before its launch than a cached one: H200 trace, docs/perf.md round 21)."""
        key = (dz.data_ptr(), dz.shape[1], dz.stride(0))
        if key not in dz_descs:  # TMA clips the store at the chunk's last column
            dz_descs[key] = TensorDescriptor.from_tensor(dz, [_ROWS, cfg.v], dz_layout)
        return dz_descs[key]

    def dlogits(chunk_begin: int, dz: torch.Tensor) -> None:
        chunk_len = dz.shape[1]
        dz_desc = prepare(dz)
        items = cdiv(n, cfg.n) * cdiv(chunk_len, cfg.v)
        _cce_dlogits_ws_kernel[(min(sms, items),)](  # persistent: one program per SM
            e_desc, c_desc, dz_desc, y2, lse, g_nll,
            g_lse if g_lse is not None else lse, dz_target,
            n, d, seq_len, vocab_start, chunk_begin, chunk_len,
            y2.stride(0), y2.stride(1), *scalars, **flags,
        )  # fmt: skip

    dlogits.prepare = prepare
    return dlogits
