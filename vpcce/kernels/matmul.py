"""The gradient GEMM: ``out (+)= A @ B`` with fp32 accumulation, tile skipping and token addressing.

Backward uses it twice per vocabulary chunk (``dz`` is that chunk's ``dL/dlogits``):

- ``dE[tokens] (+)= dz @ C[chunk]``: the output rows are tokens of the ``[B, T', D]`` gradient view;
- ``dC[chunk] = dz^T @ E``: the B-operand rows are tokens of the hidden-state view.

Epilogues (``MODE``): `STORE` writes ``acc`` once in the output's dtype; `ADD` does
``out += acc`` (fp32 or the input dtype); `HI_LO` keeps a 16-bit output ``hi`` plus a 16-bit
residual ``lo`` so that ``hi + lo`` carries ~16 significant bits across chunks (fp32-like
accumulation of dE without an fp32 ``[N, D]`` buffer). Each output tile has one owner and chunks
run in order, so every epilogue is deterministic.

``SKIP``: ``skip[m // SKIP_M, k // SKIP_K] != 0`` marks a ``dz`` tile whose contribution the
filter dropped; its K step is not multiplied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vpcce.kernels.common import cdiv, interpreting, plain_matrix, row_offsets, tma_descriptor

STORE, ADD, HI_LO = 0, 1, 2


@triton.jit
def _grad_matmul_kernel(
    # pointers
    a_ptr,  # [M, K] dz (or dz^T through strides), 16-bit or fp32; or its TMA descriptor
    b_ptr,  # [K, N] operand, rows may be tokens of a [B, T', D] view; or a TMA descriptor (TMA)
    out_ptr,  # [M, N] output; rows may be tokens of a [B, T', D] view
    lo_ptr,  # [M, N] contiguous 16-bit residual (HI_LO only)
    skip_ptr,  # int8 tile flags (SKIP only)
    # shapes
    M,
    N,
    K,
    b_seq,
    out_seq,
    # strides
    stride_am,
    stride_ak,
    stride_b_b,
    stride_b_t,
    stride_bn,
    stride_out_b,
    stride_out_t,
    stride_on,
    stride_skm,
    stride_skk,
    MODE: tl.constexpr,
    SKIP: tl.constexpr,
    SKIP_M: tl.constexpr,
    SKIP_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tl.static_assert(SKIP_M % BLOCK_M == 0, "a filter tile must cover whole M blocks")
    tl.static_assert(SKIP_K % BLOCK_K == 0, "a filter tile must cover whole K steps")
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < N
    k_offs = tl.arange(0, BLOCK_K)
    a_rows = m.to(tl.int64) * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        keep = True
        if SKIP:
            flag = tl.load(
                skip_ptr + (pid_m * BLOCK_M // SKIP_M) * stride_skm + (k0 // SKIP_K) * stride_skk
            )
            keep = flag == 0
        if keep:
            if TMA:
                a = a_ptr.load([pid_m * BLOCK_M, k0])
                b = b_ptr.load([k0, pid_n * BLOCK_N])
            else:
                k = k0 + k_offs
                k_mask = k < K
                a = tl.load(
                    a_ptr + a_rows[:, None] + k[None, :].to(tl.int64) * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                b_rows = row_offsets(k, b_seq, stride_b_b, stride_b_t)
                b = tl.load(
                    b_ptr + b_rows[:, None] + n[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    out_rows = row_offsets(m, out_seq, stride_out_b, stride_out_t)
    out_ptrs = out_ptr + out_rows[:, None] + n[None, :] * stride_on
    lo_ptrs = lo_ptr + m.to(tl.int64)[:, None] * N + n[None, :]  # (read by HI_LO only)
    epilogue(out_ptrs, lo_ptrs, acc, m_mask[:, None] & n_mask[None, :], MODE)


@triton.jit
def epilogue(out_ptrs, lo_ptrs, acc, mask, MODE: tl.constexpr):
    """Write the fp32 ``acc`` by ``MODE`` (module docstring): `STORE`, `ADD` (``out += acc``) or
    `HI_LO` (the 16-bit pair ``out + lo`` takes ``acc``)."""
    if MODE == 1:  # ADD
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 2:  # HI_LO
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)
        hi = acc.to(out_ptrs.dtype.element_ty)
        tl.store(lo_ptrs, (acc - hi.to(tl.float32)).to(lo_ptrs.dtype.element_ty), mask=mask)
        tl.store(out_ptrs, hi, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)


def _hopper_sparse(a, b3, out3, mode, skip, skip_tile):
    """`vpcce.kernels.matmul_hopper` when it takes this call (a skip mask, `STORE` or `ADD`, plain
    matrices on Hopper), with the operands as matrices; else None."""
    if skip is None or mode == HI_LO or interpreting() or a.device.type != "cuda":
        return None
    try:
        from vpcce.kernels import matmul_hopper
    except ImportError:  # a Triton without Gluon's Hopper API
        return None
    b2, out2 = plain_matrix(b3), plain_matrix(out3)
    return (matmul_hopper, b2, out2) if matmul_hopper.supported(a, b2, out2, skip_tile) else None


def grad_matmul(
    a: torch.Tensor,
    b3: torch.Tensor,
    out3: torch.Tensor,
    *,
    mode: int,
    blocks: tuple[int, int, int],
    upcast: bool,
    precision: str,
    lo: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    skip_tile: tuple[int, int] | None = None,
    warps: int = 4,
    stages: int = 2,
    rest: tuple[int, torch.Tensor] | None = None,
):
    """``out (+)= a @ b`` where ``b3`` / ``out3`` are ``[B, T', X]`` token views (or ``[1, M, X]``).

    ``skip`` (``[M / skip_tile[0], K / skip_tile[1]]``-indexed int8, any strides) skips K steps.
    ``rest`` ``(split, out3b)``: the rows of ``a`` from ``split`` (a multiple of ``skip_tile[0]``)
    go to ``out3b`` instead, ``out3`` holding those before it: one launch where the Hopper kernel
    takes both (dE's two-part scratch), else one call per part.
    """
    m, k = a.shape
    n = out3.shape[-1]
    block_m, block_n, block_k = blocks
    grid = (cdiv(m, block_m), cdiv(n, block_n))
    if m == 0 or n == 0:
        return
    skip_tile = skip_tile or (block_m, block_k)
    hopper = _hopper_sparse(a, b3, out3, mode, skip, skip_tile)
    if rest is not None:
        split, out3b = rest
        rest2 = plain_matrix(out3b)
        module = None if hopper is None else hopper[0]
        if (
            module is not None
            and split % module.BLOCK_M == 0
            and module.takes(hopper[1], rest2, a.dtype, skip_tile)
        ):
            module.launch(a, *hopper[1:], skip, skip_tile, add=mode == ADD, rest=(split, rest2))
            return
        assert skip is None or split % skip_tile[0] == 0, "parts split between skip tiles"
        rest_skip = None if skip is None else skip[split // skip_tile[0] :]
        opts = dict(mode=mode, blocks=blocks, upcast=upcast, precision=precision, lo=lo,
                    skip_tile=skip_tile, warps=warps, stages=stages)  # fmt: skip
        grad_matmul(a[:split], b3, out3, skip=skip, **opts)
        grad_matmul(a[split:], b3, out3b, skip=rest_skip, **opts)
        return
    if hopper is not None:  # the warp-specialized kernel walks the kept K blocks only
        module, b2, out2 = hopper
        module.launch(a, b2, out2, skip, skip_tile, add=mode == ADD)
        return
    lo_arg = lo if lo is not None else out3
    skip_arg = skip if skip is not None else a
    a_desc = tma_descriptor(a, [block_m, block_k])
    b_desc = tma_descriptor(b3[0] if b3.shape[0] == 1 else None, [block_k, block_n])
    tma = a_desc is not None and b_desc is not None
    _grad_matmul_kernel[grid](
        a_desc if tma else a,
        b_desc if tma else b3,
        out3,
        lo_arg,
        skip_arg,
        m,
        n,
        k,
        b3.shape[1],
        out3.shape[1],
        a.stride(0),
        a.stride(1),
        b3.stride(0),
        b3.stride(1),
        b3.stride(2),
        out3.stride(0),
        out3.stride(1),
        out3.stride(2),
        skip.stride(0) if skip is not None else 0,
        skip.stride(1) if skip is not None else 0,
        MODE=mode,
        SKIP=skip is not None,
        SKIP_M=skip_tile[0],
        SKIP_K=skip_tile[1],
        UPCAST=upcast,
        DOT_PRECISION=precision,
        TMA=tma,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
