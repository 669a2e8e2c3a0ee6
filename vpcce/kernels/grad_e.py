"""Where and how the backward accumulates ``dE = sum over vocabulary chunks of dz @ C[chunk]``.

The hidden-state gradient sums one product per vocabulary chunk, so a 16-bit gradient needs more
than 16 bits while it accumulates. The accumulator, in order of preference:

- `IN_PLACE`: the gradient itself when it is fp32 (fp32 inputs, or a vocab-parallel fp32
  reduction buffer);
- `SCRATCH`: an fp32 ``[N, D]`` accumulator borrowed from the tail of the classifier gradient's
  own buffer, whose rows are not written yet. The chunks overlapping it write their dC once dE is
  final (the last chunk from its live dz, the others after recomputing theirs): no memory, at the
  cost of recomputing ~2N vocabulary rows, taken only when that is at most `MAX_RECOMPUTE` of the
  shard;
- `FP32`: a separate fp32 buffer, when fp32 accumulation was asked for (``accum_e_fp32``) and the
  scratch would cost too much recompute;
- `HI_LO`: the 16-bit gradient plus a 16-bit ``[N, D]`` residual (`vpcce.kernels.matmul`).

Each chunk's product goes through cuBLAS (``addmm`` with an fp32 output, deterministic) where the
accumulator is one plain fp32 matrix on CUDA and no tile filter applies; else `grad_matmul`.
H100, N 8192 x D 2304, K 1280 (2026-11-25): cuBLAS into fp32 0.171 ms, Triton hi/lo 0.25 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from vpcce.kernels.common import plain_matrix
from vpcce.kernels.matmul import ADD, HI_LO, grad_matmul

IN_PLACE, SCRATCH, FP32, HI_LO_PAIR = "in_place", "scratch", "fp32", "hi_lo"

# The scratch forces recomputing the dz of the chunks it overlaps; past this fraction of the
# shard's vocabulary a separate buffer (or the hi/lo residual) is cheaper.
MAX_RECOMPUTE = 0.3

# torch.addmm(..., out_dtype=torch.float32) (16-bit operands into an fp32 output) needs torch 2.8
_ADDMM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)


def chunk_len(num_tokens: int, vocab: int, element_size: int, tile: int, dz_bytes: int) -> int:
    """Vocabulary rows per chunk: a multiple of ``tile`` with ``[N, chunk]`` within ``dz_bytes``."""
    rows = dz_bytes // max(num_tokens * element_size, 1)
    return max(tile, min(rows // tile * tile, triton.cdiv(vocab, tile) * tile))


def chunks(vocab: int, chunk: int) -> list[tuple[int, int]]:
    """``(first row, rows)`` of each vocabulary chunk, in order."""
    return [(v0, min(chunk, vocab - v0)) for v0 in range(0, vocab, chunk)]


def _scratch_start(num_tokens: int, vocab: int, dim: int) -> int:
    """Offset of the fp32 scratch in the flat ``[V, D]`` 16-bit buffer: its last ``2 N D``
    elements, the start rounded down to 16 bytes (cuBLAS and fp32 views want aligned operands).
    Negative when it does not fit."""
    return (vocab * dim - 2 * num_tokens * dim) // 8 * 8


def scratch_first_row(num_tokens: int, vocab: int, dim: int) -> int:
    """First classifier-gradient row the fp32 scratch overlaps (negative: it does not fit)."""
    start = _scratch_start(num_tokens, vocab, dim)
    return start // dim if start >= 0 else -1


def deferred(order: list[tuple[int, int]], first_row: int) -> list[tuple[int, int]]:
    """The chunks of ``order`` whose dC rows reach ``first_row``: written after dE is final."""
    return [(v0, cl) for v0, cl in order if v0 + cl > first_row]


def recompute_rows(num_tokens: int, vocab: int, dim: int, chunk: int) -> int:
    """Vocabulary rows whose dz the scratch forces to recompute (the last chunk's dz is live)."""
    order = chunks(vocab, chunk)
    first = scratch_first_row(num_tokens, vocab, dim)
    return sum(cl for v0, cl in deferred(order, first) if (v0, cl) != order[-1])


@dataclass
class EGradAccumulator:
    """The chosen accumulator of dE and the chunking that goes with it."""

    kind: str
    acc3: torch.Tensor  # what each chunk's product is added into ([B, T', D] or [1, N, D])
    lo: torch.Tensor | None  # HI_LO_PAIR's residual
    chunk: int  # vocabulary rows per chunk
    first_deferred_row: int  # chunks reaching this row write dC after dE is final

    def add(self, dz_chunk, c_chunk, *, skip, skip_tile, blocks, gemm):
        """``acc += dz_chunk @ c_chunk``; ``skip`` (tile flags) drops filtered K steps."""
        acc2 = plain_matrix(self.acc3)
        cublas = (
            skip is None
            and self.kind != HI_LO_PAIR
            and acc2 is not None
            and acc2.is_cuda
            and (c_chunk.stride(1) == 1 or c_chunk.stride(0) == 1)
            and (dz_chunk.dtype == torch.float32 or _ADDMM_OUT_DTYPE)
        )
        if cublas and dz_chunk.dtype == torch.float32:
            torch.addmm(acc2, dz_chunk, c_chunk, out=acc2)
        elif cublas:
            torch.addmm(acc2, dz_chunk, c_chunk, out_dtype=torch.float32, out=acc2)
        else:
            grad_matmul(
                dz_chunk,
                c_chunk.unsqueeze(0),
                self.acc3,
                mode=HI_LO if self.kind == HI_LO_PAIR else ADD,
                lo=self.lo,
                blocks=blocks,
                skip=skip,
                skip_tile=skip_tile,
                **gemm,
            )

    def finish(self, grad_e3: torch.Tensor):
        """Write the accumulated dE into the gradient (no-op when it accumulated in place)."""
        if self.kind in (SCRATCH, FP32):
            grad_e3.copy_(self.acc3.view(grad_e3.shape))


def accumulator(
    grad_e3: torch.Tensor,
    grad_c: torch.Tensor,
    *,
    accum_fp32: bool,
    tile: int,
    work_bytes: int,
    min_dz_bytes: int,
    chunk_bytes: int | None,
) -> EGradAccumulator:
    """Choose the accumulator (module docstring) and the chunk length its memory leaves.

    ``work_bytes`` bounds the working memory (dz and, for `HI_LO_PAIR`, the residual);
    ``chunk_bytes`` overrides the dz budget.
    """
    b, t, d = grad_e3.shape
    n, (v, _) = b * t, grad_c.shape
    esize = grad_c.element_size()
    chunk = chunk_len(n, v, esize, tile, chunk_bytes or work_bytes)
    if grad_e3.dtype == torch.float32:
        return EGradAccumulator(IN_PLACE, grad_e3.zero_(), None, chunk, v)
    first = scratch_first_row(n, v, d)
    if first >= 0 and MAX_RECOMPUTE > 0 and recompute_rows(n, v, d, chunk) <= MAX_RECOMPUTE * v:
        begin = _scratch_start(n, v, d)
        acc = grad_c.view(-1)[begin : begin + 2 * n * d].view(torch.float32).view(1, n, d).zero_()
        return EGradAccumulator(SCRATCH, acc, None, chunk, first)
    if accum_fp32:
        acc = torch.zeros((1, n, d), dtype=torch.float32, device=grad_e3.device)
        return EGradAccumulator(FP32, acc, None, chunk, v)
    residual = n * d * esize
    chunk = chunk_len(n, v, esize, tile, chunk_bytes or max(min_dz_bytes, work_bytes - residual))
    lo = torch.zeros((n, d), dtype=grad_e3.dtype, device=grad_e3.device)
    return EGradAccumulator(HI_LO_PAIR, grad_e3.zero_(), lo, chunk, v)
