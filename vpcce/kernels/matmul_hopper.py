"""Warp-specialized tile-skipping gradient GEMM for Hopper (Gluon): ``out (+)= A @ B`` over kept
K blocks only.

Same contract as `vpcce.kernels.matmul`'s ``_grad_matmul_kernel`` with a skip mask, in the `STORE`
and `ADD` modes, for plain matrices. Round 10 (docs/perf.md) found that Triton kernel 1.5x (dE)
to 3x (dC) slower than cuBLAS per useful FLOP: it tests a flag per K step, and data-dependent
TMA coordinates stop Triton's software pipelining. Here, as in `vpcce.kernels.forward_hopper`, a
producer warp reads the skip flags and streams the operands of the kept K blocks only through a
TMA ring; two consumer warpgroups own 64 of a program's 128 output rows each, one wgmma chain
over the kept K steps, and add or store their tile through plain global memory accesses. Each
output tile has one program and K runs in ascending order: deterministic.

``A`` is either an ``[M, K]`` matrix (dE: ``dz @ C``) or the transpose of a ``[K, M]`` one (dC:
``dz^T @ E``, read through a transposed shared-memory view, no copy); ``B`` is ``[K, N]``.

GPU-only (Gluon has no interpreter); `supported` says when `vpcce.kernels.matmul` uses it.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from vpcce.kernels.common import cdiv, tma_addressable
from vpcce.kernels.forward_hopper import (
    _ROWS,
    _WG0,
    _WG1,
    CONSUMER_REGS,
    PRODUCER_REGS,
    _ring,
    device_major,
    gluon_validated,
    shared_layout,
)

BLOCK_M = 2 * _ROWS  # output rows per program (two consumer warpgroups)
BLOCK_N = 256  # output columns per program: two 64 x 128 wgmma accumulators per warpgroup
BLOCK_K = 64
STAGES = 4  # 4 x (16 + 32) KB of ring
GROUP_M = 8  # output row blocks that share a wave (their A rows, every B column block)
_WG_ROWS = gl.constexpr(_ROWS)  # output rows per consumer warpgroup (the wgmma M)


@gluon.jit
def _add(x, y):
    return x + y


@gluon.jit
def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, skip_row, stride_skk, blocks_k, m0,
              n0, STEPS: gl.constexpr, A_T: gl.constexpr):  # fmt: skip
    """Stream the ``A`` and ``B`` K-slices (``STEPS`` per K block) of the K blocks whose flag in
    ``skip_row`` is 0 into the ring.

    The warp reads 32 flags at a time; the j-th kept block of them is a warp reduction, so no
    host-built list is needed (building one took ~10 small launches per GEMM, round 16)."""
    stages: gl.constexpr = a_bufs.type.shape[0]
    block_k: gl.constexpr = b_desc.block_type.shape[0]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    lanes: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    i = 0
    for base in range(0, blocks_k, 32):
        kb = base + gl.arange(0, 32, layout=lanes)
        flags = gl.load(skip_row + kb * stride_skk, mask=kb < blocks_k, other=1)
        keep = (flags == 0).to(gl.int32)
        rank = gl.associative_scan(keep, 0, _add) - keep  # kept blocks before this one
        for j in range(gl.sum(keep, axis=0)):
            block = gl.sum(gl.where((keep != 0) & (rank == j), kb, 0), axis=0)
            for s in gl.static_range(STEPS):
                k = (block * STEPS + s) * block_k
                st = i % stages
                # a fresh mbarrier counts as past phase 1: the first round finds every slot free
                mbarrier.wait(empty.index(st), ((i // stages) & 1) ^ 1)
                mbarrier.expect(ready.index(st), nbytes)
                if A_T:
                    tma.async_copy_global_to_shared(
                        a_desc, [k, m0], ready.index(st), a_bufs.index(st)
                    )
                else:
                    tma.async_copy_global_to_shared(
                        a_desc, [m0, k], ready.index(st), a_bufs.index(st)
                    )
                tma.async_copy_global_to_shared(
                    b_desc, [k, n0], ready.index(st), b_bufs.index(st)
                )
                i += 1


@gluon.jit
def _consumer(ops, WG: gl.constexpr, ADD: gl.constexpr, A_T: gl.constexpr):
    """Consumer warpgroup ``WG``: output rows ``m0 + 64 WG ...``, columns ``n0 ...``."""
    a_bufs, b_bufs, ready, empty, out_ptr, M, N, stride_om, m0, n0, num_steps = ops
    stages: gl.constexpr = a_bufs.type.shape[0]
    rows: gl.constexpr = _WG_ROWS
    half: gl.constexpr = b_bufs.type.shape[2] // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, half, 16]
    )
    if ADD:  # nothing kept: the output stays as it is (masked off, no memory traffic)
        M = gl.where(num_steps > 0, M, 0)
    m = m0 + WG * rows + gl.arange(0, rows, layout=gl.SliceLayout(1, mma))
    n = n0 + gl.arange(0, half, layout=gl.SliceLayout(0, mma))
    # ADD starts the wgmma chain from the output itself (an epilogue that loads and adds spilled
    # the loads' pointers and masks next to the accumulator); two 64 x 128 halves (one 64 x 256
    # accumulator's output accesses spilled too). Hopper's chain rounds its adds toward zero
    # (docs/perf.md round 2): <= 1 fp32 ulp of dE per kept 16-wide step, ~1e-4 relative over a
    # Llama vocabulary, 20x below dE's bf16 rounding (the filter itself costs far more)
    if ADD:
        acc_lo = _output(out_ptr, m, n, M, N, stride_om, mma)
        acc_hi = _output(out_ptr, m, n + half, M, N, stride_om, mma)
    else:
        acc_lo = gl.zeros([rows, half], gl.float32, mma)
        acc_hi = gl.zeros([rows, half], gl.float32, mma)
    for i in range(num_steps):
        st = i % stages
        mbarrier.wait(ready.index(st), (i // stages) & 1)
        if A_T:  # [BLOCK_K, BLOCK_M] tile of the [K, M] matrix: this warpgroup's columns
            a = a_bufs.index(st).slice(WG * rows, rows, dim=1).permute((1, 0))
        else:
            a = a_bufs.index(st).slice(WG * rows, rows)
        b = b_bufs.index(st)
        acc_lo = warpgroup_mma(a, b.slice(0, half, dim=1), acc_lo, is_async=True)
        acc_hi = warpgroup_mma(a, b.slice(half, half, dim=1), acc_hi, is_async=True)
        # the previous step's wgmmas are done: its slot goes back to the producer
        acc_lo, acc_hi = warpgroup_mma_wait(2, deps=(acc_lo, acc_hi))
        mbarrier.arrive(empty.index((i + stages - 1) % stages), count=1, pred=i > 0)
    acc_lo, acc_hi = warpgroup_mma_wait(0, deps=(acc_lo, acc_hi))
    # the same rows, as a value the compiler cannot prove equal to `m`: else it keeps the ADD
    # loads' 128 pointers and masks live across the K loop for the stores, and spills them
    m = gl.inline_asm_elementwise(
        "mov.b32 $0, $1;", "=r,r", [m], dtype=gl.int32, is_pure=False, pack=1
    )
    _store(acc_lo, out_ptr, m, n, M, N, stride_om)
    _store(acc_hi, out_ptr, m, n + half, M, N, stride_om)


@gluon.jit
def _offsets(m, n, M, N, stride_om):
    """int32 offsets and mask of ``out[m, n]`` (`supported` checks the output's extent; 64-bit
    offsets would need twice the registers)."""
    return m[:, None] * stride_om + n[None, :], (m < M)[:, None] & (n < N)[None, :]


@gluon.jit
def _output(out_ptr, m, n, M, N, stride_om, layout: gl.constexpr):
    offsets, mask = _offsets(m, n, M, N, stride_om)
    return gl.convert_layout(
        gl.load(out_ptr + offsets, mask=mask, other=0.0).to(gl.float32), layout, assert_trivial=True
    )


@gluon.jit
def _store(acc, out_ptr, m, n, M, N, stride_om):
    offsets, mask = _offsets(m, n, M, N, stride_om)
    gl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _sparse_matmul_ws_kernel(
    a_desc, b_desc, out_ptr, skip_ptr, M, N, K, stride_om, stride_skm, stride_skk,
    rest_ptr, split, stride_rm,
    SKIP_M: gl.constexpr, SKIP_K: gl.constexpr, A_T: gl.constexpr, ADD: gl.constexpr,
    STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):  # fmt: skip
    block_n: gl.constexpr = b_desc.block_type.shape[1]
    block_k: gl.constexpr = b_desc.block_type.shape[0]
    block_m: gl.constexpr = 2 * _WG_ROWS
    gl.static_assert(SKIP_M % block_m == 0, "a program's rows lie in one skip row")
    gl.static_assert(SKIP_K % block_k == 0, "a skip tile is whole K steps")
    # grouped order: GROUP_M row blocks walk the column blocks together (A rows and B columns
    # are re-read from L2)
    pid = gl.program_id(0)
    blocks_m = gl.cdiv(M, block_m)
    blocks_n = gl.cdiv(N, block_n)
    per_group = GROUP_M * blocks_n
    first = (pid // per_group) * GROUP_M
    group_size = gl.minimum(blocks_m - first, GROUP_M)
    pid_m = first + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    m0 = pid_m * block_m
    n0 = pid_n * block_n
    # rows from ``split`` on (a multiple of block_m) live in a second output, ``rest``
    out_m0 = m0
    out_rows = gl.minimum(M, split)
    stride_out = stride_om
    if m0 >= split:
        out_ptr = rest_ptr
        out_m0 = m0 - split
        out_rows = M - split
        stride_out = stride_rm
    # the consumers' step count: this row block's kept K blocks
    skip_row = skip_ptr + (m0 // SKIP_M).to(gl.int64) * stride_skm
    blocks_k = gl.cdiv(K, SKIP_K)
    flag_layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    count = 0
    for base in range(0, blocks_k, 128):
        kb = base + gl.arange(0, 128, layout=flag_layout)
        flags = gl.load(skip_row + kb * stride_skk, mask=kb < blocks_k, other=1)
        count += gl.sum((flags == 0).to(gl.int32), axis=0)
    # one ready / empty pair per slot: both consumers release a slot (`_ring`)
    a_bufs, b_bufs, ready, empty = _ring(a_desc, b_desc, STAGES, STAGES)
    steps = count * (SKIP_K // block_k)
    ops = (a_bufs, b_bufs, ready, empty, out_ptr, out_rows, N, stride_out, out_m0, n0, steps)
    gl.warp_specialize(
        [
            (_consumer, (ops, _WG0, ADD, A_T)),
            (_consumer, (ops, _WG1, ADD, A_T)),
            (
                _producer,
                (a_desc, b_desc, a_bufs, b_bufs, ready, empty, skip_row, stride_skk, blocks_k,
                 m0, n0, SKIP_K // block_k, A_T),
            ),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )  # fmt: skip


def available(device: torch.device, dtype: torch.dtype, skip_tile: tuple[int, int]) -> bool:
    """True when this kernel runs on ``device`` for ``dtype`` operands and skip tiles of whole
    program rows and K steps (the operands' layout aside: `supported`)."""
    if device.type != "cuda" or not gluon_validated() or device_major(device.index) != 9:
        return False
    return dtype in (torch.bfloat16, torch.float16) and not (
        skip_tile[0] % BLOCK_M or skip_tile[1] % BLOCK_K
    )


def takes(b2: torch.Tensor | None, out2: torch.Tensor | None, dtype: torch.dtype,
          skip_tile: tuple[int, int]) -> bool:  # fmt: skip
    """True when this kernel can run ``out2 (+)= a @ b2`` for any 16-bit ``a`` TMA reads
    (`available`): ``b2`` a ``dtype`` matrix TMA reads, an output with unit column stride whose
    offsets fit in int32. ``b2`` / ``out2`` are None when the token views are not one matrix."""
    if b2 is None or out2 is None or b2.dtype != dtype:
        return False
    if not available(b2.device, dtype, skip_tile):
        return False
    if out2.stride(1) != 1 or out2.shape[0] * out2.stride(0) >= 2**31:
        return False
    return tma_addressable(b2)


def supported(a: torch.Tensor, b2: torch.Tensor | None, out2: torch.Tensor | None,
              skip_tile: tuple[int, int]) -> bool:  # fmt: skip
    """`takes`, and ``a`` itself or its transpose is a matrix TMA reads."""
    return takes(b2, out2, a.dtype, skip_tile) and (tma_addressable(a) or tma_addressable(a.t()))


def _descriptor(x: torch.Tensor, block: tuple[int, int]) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(x, list(block), shared_layout(block, x.dtype))


def launch(a: torch.Tensor, b2: torch.Tensor, out2: torch.Tensor, skip: torch.Tensor,
           skip_tile: tuple[int, int], *, add: bool,
           rest: tuple[int, torch.Tensor] | None = None) -> None:  # fmt: skip
    """``out2 (+)= a @ b2`` over the K blocks whose ``skip`` flag (int8, any strides, indexed
    ``[row // skip_tile[0], k // skip_tile[1]]``) is 0.

    ``rest`` ``(split, out2b)``: the product's rows from ``split`` (a multiple of `BLOCK_M`) go
    to ``out2b``'s rows from 0 instead (``out2`` then holds rows up to ``split``): both parts of
    dE's scratch accumulator (`vpcce.kernels.grad_e`) in one launch."""
    (m, k), n = a.shape, out2.shape[1]
    split, out2b = rest if rest is not None else (cdiv(m, BLOCK_M) * BLOCK_M, out2)
    assert split % BLOCK_M == 0 and out2b.dtype == out2.dtype, "rows split between programs"
    a_t = not tma_addressable(a)  # then its transpose is (`supported`): dz^T
    a_desc = _descriptor(a.t(), (BLOCK_K, BLOCK_M)) if a_t else _descriptor(a, (BLOCK_M, BLOCK_K))
    b_desc = _descriptor(b2, (BLOCK_K, BLOCK_N))
    _sparse_matmul_ws_kernel[(cdiv(m, BLOCK_M) * cdiv(n, BLOCK_N),)](
        a_desc, b_desc, out2, skip, m, n, k, out2.stride(0), skip.stride(0), skip.stride(1),
        out2b, split, out2b.stride(0),
        SKIP_M=skip_tile[0], SKIP_K=skip_tile[1], A_T=a_t, ADD=add, STAGES=STAGES,
        GROUP_M=GROUP_M, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4,
        maxnreg=168,
    )  # fmt: skip
