"""The collectives of vocab-parallel cross-entropy; plain tensors in, plain tensors out.

Forward: one all-gather of the per-token partials (``[N, 6]`` fp32 per rank), merged by the caller
in rank order so every rank computes bitwise the same loss. Sequence parallel adds the all-gather
of the hidden states that Megatron also does. Backward: an all-reduce (or reduce-scatter, under
sequence parallelism) of the hidden-state gradient. The classifier gradient needs nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vpcce.parallel.options import VocabParallelOptions, group_rank_and_size

# torch >= 2.13 renames the tensor-in/tensor-out collectives; older releases have the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_VERIFIED: dict[tuple, int] = {}  # layout key -> global vocabulary size
_LAYOUT_FIELDS = 6  # start, stop, tokens, option fingerprint, world size, rows of c


class LayoutError(ValueError):
    """The ranks of a vocab-parallel group disagree on shards, token count or options."""


def world_size(opts: VocabParallelOptions) -> int:
    return group_rank_and_size(opts.group)[1]


def verify_layout(
    opts: VocabParallelOptions, num_tokens: int, fingerprint: int, shard_rows: int, device
) -> int:
    """Check shards and token counts across the group once per layout; return the global vocab.

    One all-gather of six integers per rank, the first time this (group, shard, N, options) is
    seen on this rank. Every rank receives every description, so every rank raises the same
    `LayoutError` instead of one rank hanging in a mismatched collective. ``shard_rows`` (the rows
    of this rank's classifier) is checked here too, for the same reason.

    The cache assumes ranks change N together (as training loops do): a rank that alone changes
    to a new N would enter this check while the others do not.
    """
    rank, world = group_rank_and_size(opts.group)
    key = (id(opts.group), opts.start, opts.stop, num_tokens, fingerprint, world, shard_rows)
    fields = [opts.start, opts.stop, num_tokens, fingerprint, world, shard_rows]
    mine = torch.tensor(fields, dtype=torch.int64)
    if world == 1:
        rows = mine[None]
    elif key in _VERIFIED:
        return _VERIFIED[key]
    else:
        # concatenated [W * 6], not stacked [W, 6]: gloo accepts only the concatenated output
        rows = torch.empty(world * _LAYOUT_FIELDS, dtype=torch.int64, device=device)
        _all_gather(rows, mine.to(device), group=opts.group)
        rows = rows.view(world, _LAYOUT_FIELDS).cpu()
    vocab = _check_rows(rows.tolist(), rank)
    _VERIFIED[key] = vocab
    return vocab


def _check_rows(rows: list[list[int]], rank: int) -> int:
    for owner, r in enumerate(rows):
        if r[5] != r[1] - r[0]:
            raise LayoutError(
                f"c has {r[5]} rows on rank {owner} but its vocab_parallel_options own "
                f"[{r[0]}, {r[1]}) (seen on rank {rank})"
            )
    tokens = {r[2] for r in rows}
    if len(tokens) > 1:
        per_rank = {i: r[2] for i, r in enumerate(rows)}
        raise LayoutError(
            f"ranks disagree on the number of tokens N: {per_rank} (seen on rank {rank})"
        )
    if len({r[3] for r in rows}) > 1:
        raise LayoutError(
            "ranks disagree on the loss options (reduction, shift, ignore_index, label_smoothing, "
            "softcap, logit_scale, sequence_parallel, reduce_e_grad, reduce_dtype, bias, "
            "return_stats) or the inputs' dtype "
            f"(seen on rank {rank})"
        )
    shards = sorted((r[0], r[1], i) for i, r in enumerate(rows))
    expected = 0
    for start, stop, owner in shards:
        if start != expected:
            kind = "gap" if start > expected else "overlap"
            raise LayoutError(
                f"vocab shards are not contiguous: {kind} at id {min(start, expected)} before rank "
                f"{owner}'s [{start}, {stop}); all shards: "
                f"{[(r[0], r[1]) for r in rows]} (seen on rank {rank})"
            )
        expected = stop
    return expected


def gather_partials(parts: torch.Tensor, opts: VocabParallelOptions) -> torch.Tensor:
    """``[N, K]`` per rank -> ``[W, N, K]`` in rank order (the forward's one collective)."""
    world = world_size(opts)
    # gathered as [W * N, K] and viewed as [W, N, K]: gloo rejects a stacked [W, N, K] output
    # ("ProcessGroupGloo::allgather: invalid tensor size"); NCCL takes either.
    out = parts.new_empty((world * parts.shape[0], *parts.shape[1:]))
    _all_gather(out, parts.contiguous(), group=opts.group)
    return out.view(world, *parts.shape)


def gather_tokens(local: torch.Tensor, opts: VocabParallelOptions) -> torch.Tensor:
    """Sequence parallel: ``[n, ...]`` per rank -> ``[W * n, ...]`` concatenated in rank order."""
    world = world_size(opts)
    out = torch.empty(
        (world * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device
    )
    _all_gather(out, local.contiguous(), group=opts.group)
    return out


class PendingReduction:
    """An asynchronous hidden-gradient reduction; `wait` returns the reduced gradient."""

    def __init__(self, work, out: torch.Tensor, dtype: torch.dtype):
        self._work, self._out, self._dtype = work, out, dtype

    def wait(self) -> torch.Tensor:
        self._work.wait()
        return self._out.to(self._dtype)


def start_hidden_grad_reduction(
    grad: torch.Tensor, opts: VocabParallelOptions, out_dtype: torch.dtype
) -> PendingReduction:
    """Start summing the hidden-state gradient over the group, in ``opts.reduction_dtype``.

    The result, in ``out_dtype``, is the full gradient (all-reduce) or, under sequence
    parallelism, this rank's ``[n, ...]`` slice of it (reduce-scatter along dim 0). A ``grad``
    already in that dtype is reduced in place of a copy. The collective is asynchronous
    so the caller can overlap it with the classifier-gradient work that remains.
    """
    world = world_size(opts)
    buf = grad.to(opts.reduction_dtype(out_dtype)).contiguous()
    if opts.sequence_parallel:
        out = torch.empty(
            (buf.shape[0] // world, *buf.shape[1:]), dtype=buf.dtype, device=buf.device
        )
        work = _reduce_scatter(out, buf, group=opts.group, async_op=True)
    else:
        work = dist.all_reduce(buf, group=opts.group, async_op=True)
        out = buf
    return PendingReduction(work, out, out_dtype)
