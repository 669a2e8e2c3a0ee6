"""Where and how the backward accumulates ``dE = sum over vocabulary chunks of dz @ C[chunk]``,
and where each chunk's ``dz`` lives.

The hidden-state gradient sums one product per vocabulary chunk, so a 16-bit gradient needs more
than 16 bits while it accumulates. The accumulator, in order of preference:

- `IN_PLACE`: the gradient itself when it is fp32 (fp32 inputs, or a vocab-parallel fp32
  reduction buffer);
- `FP32`: a separate fp32 buffer, when asked for (``accum_e_fp32``): 4ND bytes more, nothing
  recomputed (Llama 3 head: 256 MiB, -3.9 ms of the exact fw+bw's ~100, docs/perf.md round 26);
- `SCRATCH`: an fp32 ``[N, D]`` accumulator in memory that holds nothing yet: its first half of
  the tokens in the 16-bit gradient's own buffer (half the bytes of an fp32 matrix), the rest in
  the tail of the classifier gradient's buffer. The vocabulary rows whose dC memory holds it
  write their dC once dE is final, after recomputing their dz: no memory, at the cost of
  recomputing ~N vocabulary rows, taken only when that is at most `MAX_RECOMPUTE` of the shard
  (`scratch_passes` orders the chunks);
- `HI_LO`: the 16-bit gradient plus a 16-bit ``[N, D]`` residual (`vpcce.kernels.matmul`).

Each chunk's product goes through cuBLAS (``addmm`` with an fp32 output, deterministic) where the
accumulator is one plain fp32 matrix on CUDA and no tile filter applies; else `grad_matmul`.
H100, N 8192 x D 2304, K 1280 (2026-11-25): cuBLAS into fp32 0.171 ms, Triton hi/lo 0.25 ms.

Chunk sizes (`schedule`): each chunk reads and writes the whole ``[N, D]`` fp32 accumulator, so
fewer, larger chunks move less memory. The ``[N, chunk]`` dz buffer is bounded (64 MB bar), but
dC's rows that no chunk has written yet are free too: while they can hold a chunk larger than
the buffer, the chunk's dz goes there (Llama 3 head, N 16384: 26 dE products instead of 72; 18
with the scratch's rows first, `scratch_passes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from vpcce.kernels.common import MM_OUT_DTYPE, cdiv, plain_matrix
from vpcce.kernels.matmul import ADD, HI_LO, grad_matmul
from vpcce.kernels.target_dz import add_rows

IN_PLACE, SCRATCH, FP32, HI_LO_PAIR = "in_place", "scratch", "fp32", "hi_lo"

# The scratch forces recomputing the dz of the chunks it overlaps; past this fraction of the
# shard's vocabulary the hi/lo residual is cheaper.
MAX_RECOMPUTE = 0.3

# dE products narrower than this (K, vocabulary rows) pay for the fp32 accumulator's traffic:
# cuBLAS hides it behind a longer product (H100, 8192 x 4096 into fp32: +34% over a bf16 output
# at K 1792, +0% at K 3584). Where the dz buffer's chunks are this narrow the scratch's rows come
# first (`scratch_passes`; Llama 3 head at N 16384: -1.1 ms of 107), else last (Gemma 2 head at
# N 8192, 3584-row chunks: +0.2 ms of 59 first). 0: always last, as up to round 17.
NARROW_PRODUCT = 2048

# Element alignment of everything placed inside dC's buffer: 16 bytes for cuBLAS and TMA, in
# elements of up to 8 bytes, with room to spare (128 bytes for 16-bit elements).
_ALIGN = 64

# Bytes of fp32 rows in the first block narrowed to 16 bits through a temporary
# (`_narrow_in_place`): the temporary's size is half of that.
_NARROW_BYTES = 2**20


def chunk_len(num_tokens: int, vocab: int, element_size: int, tile: int, dz_bytes: int) -> int:
    """Vocabulary rows per chunk: a multiple of ``tile`` with ``[N, chunk]`` within ``dz_bytes``."""
    rows = dz_bytes // max(num_tokens * element_size, 1)
    return max(tile, min(rows // tile * tile, cdiv(vocab, tile) * tile))


@dataclass(frozen=True)
class Chunk:
    """One vocabulary chunk of the backward."""

    begin: int  # first vocabulary row
    rows: int
    dz_at: int | None = None  # element offset of its [N, rows] dz in dC's buffer; None: the buffer
    dz_cols: int | None = None  # the row stride of that dz (whole tiles: TMA writes it)
    # the first pass adds its dE product only: its dC rows hold the scratch (written once dE is
    # final, `EGradAccumulator.recompute`)
    deferred: bool = False


def schedule(
    num_tokens: int,
    vocab: int,
    dim: int,
    *,
    chunk: int,
    tile: int,
    free_end: int | None,
    begin: int = 0,
) -> list[Chunk]:
    """The chunks of rows ``begin`` to ``vocab``, in order. A chunk of ``rows`` rows from row
    ``v0`` may put its dz in dC's elements from ``(v0 + rows) D`` to ``free_end``, which no chunk
    has written yet (``free_end``: where dC's unwritten memory ends, None: do not borrow it). It
    does when they hold more than ``chunk`` rows (whole ``tile`` multiples), else it takes
    ``chunk`` rows and the dz buffer. A borrowing chunk ends before ``free_end``'s row."""
    out, v0 = [], begin
    while v0 < vocab:
        rows = 0
        if free_end is not None:  # (v0 + rows) D + N rows <= free_end, with alignment slack
            rows = max(free_end - _ALIGN - v0 * dim, 0) // (dim + num_tokens)
            rows = min(rows, vocab - v0) // tile * tile
        if rows > chunk:
            dz_at = (free_end - num_tokens * rows) // _ALIGN * _ALIGN
            out.append(Chunk(v0, rows, dz_at, rows))
        else:
            out.append(Chunk(v0, min(chunk, vocab - v0)))
        v0 += out[-1].rows
    return out


def _scratch_elements(num_tokens: int, dim: int, element_size: int) -> int:
    """Elements of a ``[V, D]`` buffer (16- or 32-bit) that an fp32 ``[num_tokens, D]`` takes."""
    return num_tokens * dim * 4 // element_size


def _scratch_start(num_tokens: int, vocab: int, dim: int, element_size: int = 2) -> int:
    """Offset of an fp32 ``[num_tokens, D]`` scratch in the flat ``[V, D]`` buffer: its last
    elements, the start aligned down. Negative when it does not fit."""
    size = _scratch_elements(num_tokens, dim, element_size)
    return (vocab * dim - size) // _ALIGN * _ALIGN


def _own_rows(grad_e3: torch.Tensor, row_block: int) -> int:
    """Tokens whose fp32 accumulator rows fit in the 16-bit gradient's own buffer: half of them,
    whole token blocks; 0 when that buffer is not one contiguous aligned matrix."""
    b, t, _ = grad_e3.shape
    if grad_e3.element_size() != 2 or not grad_e3.is_contiguous() or grad_e3.data_ptr() % 16:
        return 0
    return b * t // 2 // row_block * row_block


def scratch_passes(
    num_tokens: int,
    vocab: int,
    dim: int,
    *,
    chunk: int,
    tile: int,
    start: int,
    borrow: bool,
    first: bool = True,
) -> tuple[list[Chunk], list[Chunk], Chunk | None]:
    """The chunks when dC's elements from ``start`` hold the dE scratch: the first pass (dz, its
    dE product, and dC unless deferred), the recompute pass once dE is final (dz and dC of the
    deferred rows), and the recompute chunk whose dz the first pass left in place, if any.

    Borrowing and ``first``, the scratch's rows (from the whole tile holding ``start``) come
    first, as one chunk whose dz lies in dC's rows below them, none of which is written yet: one
    wide dE product instead of ~N / chunk narrow ones, each of which reads and writes the whole
    fp32 accumulator (H100, an 8192 x 4096 product into fp32: 0.057 ms more than into bf16 at
    K 1792, nothing at K 3584). Then the rows below, borrowing up to the scratch (`schedule`);
    the recompute borrows the scratch's own rows, free by then. Otherwise (no borrowing, or that
    dz does not fit below) the scratch's rows come last, and the last chunk's dz is live for its
    dC: up to a chunk fewer rows recomputed."""
    tail = start // dim // tile * tile
    cols = cdiv(vocab - tail, tile) * tile
    if borrow and first and tail > 0 and num_tokens * cols <= tail * dim:
        rows_first = Chunk(tail, vocab - tail, 0, cols, deferred=True)
        below = schedule(num_tokens, tail, dim, chunk=chunk, tile=tile, free_end=start)
        again = schedule(
            num_tokens, vocab, dim, chunk=chunk, tile=tile, free_end=vocab * dim, begin=tail
        )
        return [rows_first, *below], again, None
    order = schedule(
        num_tokens, vocab, dim, chunk=chunk, tile=tile, free_end=start if borrow else None
    )
    order = [replace(ch, deferred=ch.begin + ch.rows > start // dim) for ch in order]
    # the last chunk (deferred: it reaches the last row) first, before a dz overwrites its own
    again = [ch for ch in reversed(order) if ch.deferred]
    return order, again, again[0] if again else None


def _narrow_in_place(acc: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = acc`` for an fp32 ``acc`` ``[R, D]`` and a 16-bit ``out`` ``[R, D]`` that start
    at the same address. Row block ``[a, a + s)`` with ``s <= a`` writes the bytes of fp32 rows
    below ``a``, already narrowed, so blocks double in order; the first goes through a
    temporary."""
    rows, dim = acc.shape
    done = min(rows, max(1, _NARROW_BYTES // (dim * acc.element_size())))
    out[:done].copy_(acc[:done].to(out.dtype))
    while done < rows:
        step = min(done, rows - done)
        out[done : done + step].copy_(acc[done : done + step])
        done += step


@dataclass
class EGradAccumulator:
    """The chosen accumulator of dE and the chunks that go with it."""

    kind: str
    # (first token, end token, what those tokens' products are added into: [B, T', D] or
    # [1, rows, D]); SCRATCH's first part lives in the gradient's own buffer
    parts: list[tuple[int, int, torch.Tensor]]
    lo: torch.Tensor | None  # HI_LO_PAIR's residual
    order: list[Chunk]  # the first pass
    # SCRATCH: once dE is final, the deferred rows' dC (`scratch_passes`), their dz recomputed
    # except the `live` chunk's
    recompute: list[Chunk] = field(default_factory=list)
    live: Chunk | None = None

    @property
    def chunks(self) -> list[Chunk]:
        return self.order + self.recompute

    @property
    def dz_columns(self) -> int:
        """Columns the dz buffer needs: the largest chunk that does not borrow dC's rows."""
        return max((ch.rows for ch in self.chunks if ch.dz_at is None), default=0)

    @property
    def recompute_rows(self) -> int:
        """Vocabulary rows whose dz is computed twice."""
        return sum(ch.rows for ch in self.recompute if ch != self.live)

    def add(self, dz_chunk, c_chunk, *, skip, skip_tile, blocks, gemm):
        """``acc += dz_chunk @ c_chunk``; ``skip`` (tile flags) drops filtered K steps."""
        if skip is not None and len(self.parts) == 2:  # the scratch's two parts, one GEMM call
            (_, split, acc3), (_, _, rest3) = self.parts
            grad_matmul(
                dz_chunk, c_chunk.unsqueeze(0), acc3, mode=ADD, blocks=blocks, skip=skip,
                skip_tile=skip_tile, rest=(split, rest3), **gemm,
            )  # fmt: skip
            return
        for r0, r1, acc3 in self.parts:
            assert skip is None or r0 % skip_tile[0] == 0, "parts split between skip tiles"
            self._add(
                dz_chunk[r0:r1],
                c_chunk,
                acc3,
                skip=None if skip is None else skip[r0 // skip_tile[0] :],
                skip_tile=skip_tile,
                blocks=blocks,
                gemm=gemm,
            )

    def _add(self, dz_chunk, c_chunk, acc3, *, skip, skip_tile, blocks, gemm):
        acc2 = plain_matrix(acc3)
        cublas = (
            skip is None
            and self.kind != HI_LO_PAIR
            and acc2 is not None
            and acc2.is_cuda
            and (c_chunk.stride(1) == 1 or c_chunk.stride(0) == 1)
            and (dz_chunk.dtype == torch.float32 or MM_OUT_DTYPE)
        )
        if cublas and dz_chunk.dtype == torch.float32:
            torch.addmm(acc2, dz_chunk, c_chunk, out=acc2)
        elif cublas:
            torch.addmm(acc2, dz_chunk, c_chunk, out_dtype=torch.float32, out=acc2)
        else:
            grad_matmul(
                dz_chunk,
                c_chunk.unsqueeze(0),
                acc3,
                mode=HI_LO if self.kind == HI_LO_PAIR else ADD,
                lo=self.lo,
                blocks=blocks,
                skip=skip,
                skip_tile=skip_tile,
                **gemm,
            )

    def add_rows(self, weights: torch.Tensor, rows: torch.Tensor, c: torch.Tensor):
        """``acc[n] += weights[n] * c[rows[n]]`` where ``weights[n] != 0`` (``[N]`` fp32 and
        int64; `vpcce.kernels.target_dz`), in the accumulator's precision."""
        for r0, r1, acc3 in self.parts:
            add_rows(acc3, weights[r0:r1], rows[r0:r1], c, self.lo)

    def finish(self, grad_e3: torch.Tensor):
        """Write the accumulated dE into the gradient (no-op when it accumulated in place)."""
        if self.kind not in (SCRATCH, FP32):
            return
        if len(self.parts) == 1:
            grad_e3.copy_(self.parts[0][2].view(grad_e3.shape))
            return
        (_, own, mine), (_, n, tail) = self.parts  # SCRATCH in two parts: grad_e3 is contiguous
        grad_e2 = grad_e3.view(n, -1)
        _narrow_in_place(mine[0], grad_e2[:own])  # first: the tail's rows overwrite the rest
        grad_e2[own:].copy_(tail[0])


def accumulator(
    grad_e3: torch.Tensor,
    grad_c: torch.Tensor,
    *,
    accum_fp32: bool,
    tile: int,
    row_block: int,
    work_bytes: int,
    min_dz_bytes: int,
    chunk_bytes: int | None,
    borrow: bool,
) -> EGradAccumulator:
    """Choose the accumulator (module docstring) and the chunks its memory leaves.

    ``work_bytes`` bounds the working memory (dz and, for `HI_LO_PAIR`, the residual);
    ``chunk_bytes`` overrides the dz budget. ``borrow``: chunks may put their dz in dC's unwritten
    rows. ``row_block``: tokens per tile of the skip flags (the scratch splits between tiles).
    """
    b, t, d = grad_e3.shape
    n, (v, _) = b * t, grad_c.shape
    esize = grad_c.element_size()
    chunk = chunk_len(n, v, esize, tile, chunk_bytes or work_bytes)

    def order(chunk: int) -> list[Chunk]:
        return schedule(n, v, d, chunk=chunk, tile=tile, free_end=v * d if borrow else None)

    if grad_e3.dtype == torch.float32:
        return EGradAccumulator(IN_PLACE, [(0, n, grad_e3.zero_())], None, order(chunk))
    if accum_fp32:
        acc = torch.zeros((1, n, d), dtype=torch.float32, device=grad_e3.device)
        return EGradAccumulator(FP32, [(0, n, acc)], None, order(chunk))
    # dC is fp32 while dE is 16-bit where fp32 inputs reduce their hidden gradient in 16 bits
    own = _own_rows(grad_e3, row_block)
    start = _scratch_start(n - own, v, d, esize)
    # the scratch's rows first (fewer narrow dE products), else last (a chunk fewer rows
    # recomputed)
    orders = (True, False) if chunk < NARROW_PRODUCT else (False,)
    for first in orders if start >= 0 and MAX_RECOMPUTE > 0 else ():
        passes = scratch_passes(
            n, v, d, chunk=chunk, tile=tile, start=start, borrow=borrow, first=first
        )
        acc = EGradAccumulator(SCRATCH, [], None, *passes)
        if acc.recompute_rows <= MAX_RECOMPUTE * v:
            size = _scratch_elements(n - own, d, esize)
            tail = grad_c.view(-1)[start : start + size].view(torch.float32)
            acc.parts.append((own, n, tail.view(1, n - own, d).zero_()))
            if own:
                mine = grad_e3.view(-1)[: 2 * own * d].view(torch.float32)
                acc.parts.insert(0, (0, own, mine.view(1, own, d).zero_()))
            return acc
    residual = n * d * grad_e3.element_size()
    chunk = chunk_len(n, v, esize, tile, chunk_bytes or max(min_dz_bytes, work_bytes - residual))
    lo = torch.zeros((n, d), dtype=grad_e3.dtype, device=grad_e3.device)
    return EGradAccumulator(HI_LO_PAIR, [(0, n, grad_e3.zero_())], lo, order(chunk))
