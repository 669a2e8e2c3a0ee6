"""Shared pieces of the CCE kernels: token addressing, the logits tile, launch settings.

Every kernel addresses token ``n`` of the ``[B, T', D]`` hidden-state view as ``(n // T', n % T')``
through its strides, so ``shift`` and strided inputs need no copy. Offsets are int64 because
``N x D`` and ``V x D`` element offsets exceed 2^31 at LLM sizes (e.g. 256000 x 8192).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host integers. (``triton.cdiv`` is a constexpr function: each host call
    goes through Triton's wrapper, ~4 us; a forward made ~55 of them before its launch.)"""
    return -(-a // b)


def upcast_tiles(dtype: torch.dtype) -> bool:
    """The interpreter computes bf16/fp16 arithmetic wrongly: upcast loaded tiles to fp32 there."""
    return interpreting() and dtype in (torch.bfloat16, torch.float16)


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs follow ``torch.get_float32_matmul_precision`` (tf32 unless "highest").

    16-bit inputs take tl.dot's default (None): the option only concerns fp32 operands.
    """
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch settings of one kernel family."""

    n: int  # tokens per tile
    v: int  # vocabulary entries per tile
    d: int  # hidden-dimension step of the logits dot product
    gemm_n: int  # output columns (hidden dimension) per gradient-GEMM program
    gemm_k: int  # reduction step of the gradient GEMMs (divides n and v: filter tiles)
    warps: int
    stages: int
    gemm_stages: int  # pipeline depth of the gradient GEMM (its tiles differ from the logits')
    split_acc: bool = False  # add partial dots to the accumulator with an fp32 FADD
    split_every: int = 1  # K steps chained on the tensor cores per fp32 FADD (with split_acc)
    flatten: bool = False  # pipeline the forward's vocab-tile and K loops as one loop
    group_n: int = 8  # token blocks that walk a backward chunk's tiles together (L2 reuse)
    warp_specialize: bool = False  # producer/consumer warps for the forward's vocab-tile loop


# H100, bf16, 2026-11-25 (docs/perf.md rounds 8-9). Forward (the loss and LSE): 64 x 256 tiles,
# 64-wide K steps, 4 stages, split accumulation: Hopper's tensor-core accumulator chain truncates,
# biasing logits toward zero by ~58 fp32 ulps at |z| ~ 14 (loss error vs fp64 3.4e-5 chained,
# 7e-7 split, at +4 ms on the Gemma shape). Flattening the tile and K loops: -1 ms.
GPU_FORWARD_BLOCKS = Blocks(
    n=64,
    v=256,
    d=64,
    gemm_n=128,
    gemm_k=64,
    warps=8,
    stages=4,
    gemm_stages=3,
    split_acc=True,
    flatten=True,
)
# H100, bf16 (rounds 12 and 14): the warp-specialized Gluon forward
# (`vpcce.kernels.forward_hopper`), used on Hopper where TMA can read both operands as plain
# 16-bit matrices; the Triton forward above otherwise. 128 token rows (two consumer warpgroups of
# 64) x 256 vocabulary rows x 64-wide K steps, a 4-slot TMA ring (192 KB); split accumulation over
# chains of 2 K steps, one mbarrier pair per chain (Gemma 15.7 ms, 1.16 x GEMM; one K step per
# chain: 18.3 ms). None: always the Triton forward.
HOPPER_FORWARD_BLOCKS: Blocks | None = Blocks(
    n=128,
    v=256,
    d=64,
    gemm_n=128,
    gemm_k=64,
    warps=4,
    stages=4,
    gemm_stages=3,
    split_acc=True,
    split_every=2,
)
# H100, bf16 (round 13): the warp-specialized Gluon dlogits kernel (`vpcce.kernels.backward_hopper`)
# for the exact backward without a bias, where TMA can read the operands and write dz: the
# backward's 128 x 256 tiles, chained accumulation, 3 ring stages + two 32 KB dz store buffers
# (round 28: 4 stages with the dz tile stored in halves through 16 KB buffers ran no faster
# on the persistent grid).
HOPPER_BACKWARD_BLOCKS: Blocks | None = Blocks(
    n=128,
    v=256,
    d=64,
    gemm_n=128,
    gemm_k=64,
    warps=4,
    stages=3,
    gemm_stages=3,
)
# Backward (dlogits recompute, Triton gradient GEMMs, filter tiles): dz = p - q needs the logits
# only to ~1e-5 relative next to its 16-bit rounding, so the chained accumulator is exact enough
# (dE / dC errors unchanged at 2 digits) and frees the registers for 128 x 256 tiles: Gemma
# fw+bw 82.1 -> 75.6 ms, Llama 154.8 -> 139.2 ms. Token blocks walk each chunk in groups of 8
# (L2 reuse of E): Llama 173 -> 155 ms. Gradient GEMM (K = chunk): 3 stages.
GPU_BLOCKS = Blocks(
    n=128,
    v=256,
    d=64,
    gemm_n=128,
    gemm_k=64,
    warps=8,
    stages=3,
    gemm_stages=3,
    split_acc=False,
)
# The interpreter's cost grows with programs x loop steps: blocks big enough for test shapes.
INTERPRETER_BLOCKS = Blocks(
    n=32, v=64, d=64, gemm_n=64, gemm_k=64, warps=4, stages=1, gemm_stages=1
)


def _for_dtype(cfg: Blocks, dtype: torch.dtype | None) -> Blocks:
    # 4-byte operands: half the K step keeps the pipeline's shared memory (stages x K step x
    # tile rows x bytes) at the 16-bit tiles' size, under Hopper's 227 KB
    if dtype is not None and dtype.itemsize == 4 and not interpreting():
        return replace(cfg, d=cfg.d // 2)
    return cfg


def blocks(dtype: torch.dtype | None = None) -> Blocks:
    """Tiles of the backward kernels (dlogits recompute and gradient GEMMs) for ``dtype`` inputs."""
    return _for_dtype(INTERPRETER_BLOCKS if interpreting() else GPU_BLOCKS, dtype)


def forward_blocks(dtype: torch.dtype | None = None) -> Blocks:
    """Tiles of the fused forward for ``dtype`` inputs."""
    return _for_dtype(INTERPRETER_BLOCKS if interpreting() else GPU_FORWARD_BLOCKS, dtype)


def hopper_forward_blocks() -> Blocks | None:
    """Tiles of the warp-specialized Hopper forward; None where it is off or interpreting."""
    return None if interpreting() else HOPPER_FORWARD_BLOCKS


def hopper_backward_blocks() -> Blocks | None:
    """Tiles of the warp-specialized Hopper dlogits kernel; None where it is off or interpreting."""
    return None if interpreting() else HOPPER_BACKWARD_BLOCKS


# torch.mm / addmm(..., out_dtype=torch.float32) (16-bit operands into an fp32 output): torch 2.8
MM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)

# bf16 dz, rounded stochastically with a dither, deterministic (docs/perf.md round 19):
# round-to-nearest of a near-uniform softmax rounds a token's ~V equal probabilities the same way,
# and their errors add up along C's mean row in dE (H200, Llama 3 head at 12 nats: dE 1.79e-3
# against the materialized baseline's 1.72e-3 and a floor of 1.66e-3). Entry (token n, global
# vocabulary id v) adds the top 16 bits of n * DZ_DITHER_N + v * DZ_DITHER_V (mod 2^32: a 2-D Weyl
# lattice, equidistributed along each token's row, for dE, and along each column, for dC) to
# dz's fp32 bits and drops the low 16 bits, so dz rounds up with the probability of its
# fraction; NaN is kept as it is (its bits would carry into the sign). A shard's entries are
# those of the whole vocabulary. fp16 dz rounds to nearest (its bits do not truncate to it).
STOCHASTIC_DZ = True
DZ_DITHER_V = 0xC13FA9A9  # 2^32 / g and 2^32 / g^2, g = 1.3247... (the plastic number: R2)
DZ_DITHER_N = 0x91E10DA5


def stochastic_dz(dtype: torch.dtype) -> bool:
    """Whether the dlogits kernels round a ``dtype`` dz stochastically (`STOCHASTIC_DZ`)."""
    return STOCHASTIC_DZ and dtype == torch.bfloat16


def even_d(d: int, cfg: Blocks) -> bool:
    """True when the K loop's steps tile ``d`` exactly, so the kernels drop the ``d < D`` masks."""
    return d % (cfg.d * (cfg.split_every if cfg.split_acc else 1)) == 0


# Load tiles through Hopper's tensor memory accelerator (host-built descriptors) when operands
# allow it; a module switch so the performance log can compare both paths on the same build.
USE_TMA = True


def plain_matrix(x3: torch.Tensor) -> torch.Tensor | None:
    """``[B, T', D]`` token view as one ``[B * T', D]`` matrix view, or None if it is not one.

    ``shift > 0`` with several sequences leaves a gap between them; a strided last dimension
    is not a plain matrix either.
    """
    b, t, d = x3.shape
    if x3.stride(2) != 1 or (b > 1 and x3.stride(0) != t * x3.stride(1)):
        return None
    return x3.reshape(b * t, d)


def tma_addressable(x: torch.Tensor) -> bool:
    """TMA's layout rule for a 2-D ``x``: contiguous last dimension, 16-byte aligned base and row
    stride."""
    aligned = x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0
    return x.stride(-1) == 1 and aligned


def tma_descriptor(x: torch.Tensor | None, block: list[int]):
    """A TMA descriptor of the 2-D ``x`` with tiles of ``block``, or None where TMA cannot read it.

    TMA needs a CUDA tensor with a contiguous last dimension and 16-byte aligned base and strides;
    out-of-bounds tiles are zero-filled, so kernels need no load masks.
    """
    if x is None or not USE_TMA or interpreting() or x.device.type != "cuda":
        return None
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return None
    if not tma_addressable(x):
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor.from_tensor(x, block)


@triton.jit
def row_offsets(rows, seq_len, stride_b, stride_t):
    """int64 element offsets of flat token ids ``rows`` in a ``[B, T', ...]`` strided view."""
    rows = rows.to(tl.int64)
    return (rows // seq_len) * stride_b + (rows % seq_len) * stride_t


@triton.jit
def tanh(x):
    # sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}): finite for every x (tl has no tanh on all targets)
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _dot_step(
    e_ptr, c_ptr, e_rows, n_mask, c_rows, v_mask, D, n0, v0, d0, stride_ed, stride_cd, acc,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    TMA: tl.constexpr,
):
    """``acc + e[tile, d0:d0+BLOCK_D] @ c[tile, d0:d0+BLOCK_D].T`` (one K step of `logits_tile`)."""
    if TMA:
        e_tile = e_ptr.load([n0, d0])
        c_tile = tl.trans(c_ptr.load([v0, d0]))
    else:
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = (d < D) | EVEN_D  # EVEN_D: the steps tile D exactly, the compiler drops the test
        e_tile = tl.load(
            e_ptr + e_rows[:, None] + d[None, :] * stride_ed,
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        c_tile = tl.load(  # [BLOCK_D, BLOCK_V]: c^T, read through strides (no copy of c)
            c_ptr + c_rows[None, :] + d[:, None] * stride_cd,
            mask=v_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
    if UPCAST:
        e_tile = e_tile.to(tl.float32)
        c_tile = c_tile.to(tl.float32)
    return tl.dot(e_tile, c_tile, acc, input_precision=DOT_PRECISION)


@triton.jit
def logits_tile(
    e_ptr,
    c_ptr,
    bias_ptr,
    e_rows,
    n_mask,
    v,
    v_mask,
    D,
    n0,
    v0,
    stride_ed,
    stride_cv,
    stride_cd,
    stride_bias,
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
):
    """fp32 ``softcap(logit_scale * (e @ c.T + bias))`` for one ``[BLOCK_N, BLOCK_V]`` tile.

    With ``TMA``, ``e_ptr`` / ``c_ptr`` are descriptors of ``[N, D]`` / ``[V, D]`` and the tile
    starts at token ``n0``, vocabulary row ``v0``; otherwise they are pointers addressed through
    ``e_rows`` / ``v``. Out-of-range rows/columns are computed from zero-filled operands; callers
    mask them.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    c_rows = v.to(tl.int64) * stride_cv
    if SPLIT_ACC:
        # Hopper's tensor-core accumulator chain truncates: chain SPLIT_EVERY K steps from zero,
        # then round the partial into the fp32 accumulator with an IEEE FADD (an fma is not folded
        # back into the chain).
        for d0 in range(0, D, BLOCK_D * SPLIT_EVERY):
            part = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for i in tl.static_range(SPLIT_EVERY):
                part = _dot_step(
                    e_ptr, c_ptr, e_rows, n_mask, c_rows, v_mask, D, n0, v0, d0 + i * BLOCK_D,
                    stride_ed, stride_cd, part, UPCAST, DOT_PRECISION, BLOCK_D, EVEN_D, TMA,
                )
            acc = tl.fma(part, 1.0, acc)
    else:
        for d0 in range(0, D, BLOCK_D):
            acc = _dot_step(
                e_ptr, c_ptr, e_rows, n_mask, c_rows, v_mask, D, n0, v0, d0,
                stride_ed, stride_cd, acc, UPCAST, DOT_PRECISION, BLOCK_D, EVEN_D, TMA,
            )
    if HAS_BIAS:
        b = tl.load(bias_ptr + v.to(tl.int64) * stride_bias, mask=v_mask, other=0.0)
        acc += b.to(tl.float32)[None, :]
    acc = acc * logit_scale
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc
