"""The target column of ``dz``, from the forward's target logit, and its 16-bit rounding residual.

A confident token's largest gradient entry is its target's, ``dz = g (p_y - 1)``, and it is the
one entry whose error shows in both gradients (docs/perf.md round 19, H200, Llama 3 head at
1 nat: dE 2.7e-3 / dC 3.5e-3 against a floor of 1.66e-3, the 16-bit rounding of the truth):

- the Hopper dlogits kernel recomputes logits in one tensor-core accumulation chain, whose
  truncation (~1e-5 relative, `vpcce.kernels.common`) is far below the 16-bit rounding of
  ``dz`` for every entry but this one: ``p_y - 1`` cancels, ``p_y`` does not;
- its rounding to 16 bits: ~2^-9 of the largest entry.

So the backward computes each token's target entry here from the forward's target logit (split
accumulation, `vpcce.kernels.target_logit`) and the LSE, in fp64; the dlogits kernels write
its 16-bit value ``hi`` into the target's column in place of their own, and `add_rows` adds
``residual = dz - hi`` times the target's classifier row to the fp32 dE accumulator. dE then
sees the target entry at fp32 precision. dC keeps ``hi``: its rows are written once, in 16
bits, by one GEMM, and a correction would round them twice (or cost a pass over dC).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vpcce.kernels.common import cdiv, row_offsets
from vpcce.kernels.matmul import ADD, HI_LO, epilogue


def target_dz(
    z_target: torch.Tensor,
    lse: torch.Tensor,
    g_nll: torch.Tensor,
    g_lse: torch.Tensor | None,
    *,
    target_weight: float,
    uniform_weight: float,
    logit_scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """fp32 ``[N]``: ``dL/dz`` at each token's target column (`vpcce.kernels.backward`'s math at
    ``v = y``), in fp64 from the target logit ``z_target`` (after scale and softcap) and the
    global LSE. Meaningless for tokens whose target is not in the shard."""
    z, g = z_target.double(), g_nll.double()
    g_p = g if g_lse is None else g + g_lse.double()
    dz = g_p * torch.exp(z - lse.double()) - g * (target_weight + uniform_weight)
    if softcap is not None:
        dz = dz * (1.0 - (z / softcap) ** 2)  # d/dx [s tanh(x / s)] at the capped logit
    return (dz * logit_scale).float()


def split(dz: torch.Tensor, dtype: torch.dtype, owned: torch.Tensor):
    """``(hi, residual)``: ``dz`` rounded to ``dtype`` (what the kernels write) and the fp32
    rest, 0 where the token's target is not ``owned`` (``[N]`` bool)."""
    hi = dz.to(dtype)
    residual = torch.where(owned, dz - hi.float(), torch.zeros_like(dz))
    return hi, residual


@triton.jit
def _add_rows_kernel(
    out_ptr,  # [B, T', D] fp32 or 16-bit (HI_LO: the high part), strided view
    lo_ptr,  # [M, D] contiguous 16-bit residual (HI_LO only)
    w_ptr,  # [M] fp32 weights (0: no row)
    rows_ptr,  # [M] int64 rows of c
    c_ptr,  # [V, D] 16-bit classifier shard
    M,
    D,
    seq_len,
    stride_ob,
    stride_ot,
    stride_od,
    stride_cv,
    stride_cd,
    MODE: tl.constexpr,  # `vpcce.kernels.matmul`'s ADD or HI_LO
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + m, mask=m < M, other=0.0)
    rows = tl.load(rows_ptr + m, mask=m < M, other=0)
    take = (m < M) & (w != 0.0)  # other shards' and ignored tokens touch nothing
    mask = take[:, None] & (d < D)[None, :]
    c = tl.load(c_ptr + rows[:, None] * stride_cv + d[None, :] * stride_cd, mask=mask, other=0.0)
    out_rows = row_offsets(m, seq_len, stride_ob, stride_ot)
    out_ptrs = out_ptr + out_rows[:, None] + d[None, :] * stride_od
    lo_ptrs = lo_ptr + m.to(tl.int64)[:, None] * D + d[None, :]  # (read by HI_LO only)
    epilogue(out_ptrs, lo_ptrs, w[:, None] * c.to(tl.float32), mask, MODE)


def add_rows(
    out3: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    c: torch.Tensor,
    lo: torch.Tensor | None = None,
) -> None:
    """``out3[m] += weights[m] * c[rows[m]]`` for the tokens ``m`` of a ``[B, T', D]`` view,
    in fp32, where ``weights[m] != 0``; with ``lo`` (``[M, D]``) the hi/lo pair ``out3 + lo``
    takes the sum. Each element has one owner: deterministic."""
    b, t, d = out3.shape
    if b * t == 0:
        return
    block_m, block_d = 32, min(256, triton.next_power_of_2(d))
    _add_rows_kernel[(cdiv(b * t, block_m), cdiv(d, block_d))](
        out3, lo if lo is not None else out3, weights, rows, c, b * t, d, t, out3.stride(0),
        out3.stride(1), out3.stride(2), c.stride(0), c.stride(1), MODE=ADD if lo is None else HI_LO,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
