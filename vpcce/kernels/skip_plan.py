"""Which backward tiles ``filter_eps`` skips, decided from the forward's tile bounds, unseen.

The tile filter (apple's rule) drops a ``[BLOCK_N, BLOCK_V]`` tile of ``dz`` when every
``|p - q|`` in it is below ``filter_eps``. Away from the targets, ``|p - q| <= max(p, u)``
(``u``: the label-smoothing weight) and ``exp(bound)`` bounds ``p`` there
(`vpcce.kernels.tile_summary`), so a tile with ``max(exp(bound), u) < filter_eps`` and no target
of its block is dropped without being recomputed or multiplied. Tiles the plan keeps are still
tested after their recompute: the dropped set is exactly the filter's.

Device tensors in, an int8 ``[token blocks, vocab tiles]`` plan out: no host synchronization.
"""

from __future__ import annotations

import torch


def _target_tiles(y: torch.Tensor, vocab_start: int, vocab: int, block_n: int, block_v: int):
    """Flat ``[blocks, vocab tiles]`` index of each token's target tile; -1 for other shards'."""
    local = y.to(torch.int64) - vocab_start
    here = (local >= 0) & (local < vocab)
    tiles = -(-vocab // block_v)
    block = torch.arange(y.numel(), device=y.device) // block_n
    return torch.where(here, block * tiles + local.clamp(0, vocab - 1) // block_v, -1)


def plan(
    bounds: torch.Tensor,
    y: torch.Tensor,
    *,
    vocab_start: int,
    vocab: int,
    block_n: int,
    block_v: int,
    uniform_weight: float,
    filter_eps: float,
) -> torch.Tensor:
    """int8 ``[token blocks, vocab tiles]``, 1 where the tile is dropped unseen.

    ``bounds``: `vpcce.kernels.tile_summary.tile_bounds` of this shard (``vocab`` rows); ``y``:
    ``[N]`` global target ids (ignored tokens' ids fall outside the shard or hit a tile that is
    then merely recomputed).
    """
    size = bounds.exp().clamp(min=uniform_weight)  # NaN logits gave +inf bounds: never below
    target = _target_tiles(y, vocab_start, vocab, block_n, block_v)
    free = torch.ones(bounds.numel() + 1, dtype=torch.bool, device=bounds.device)
    free.index_fill_(0, torch.where(target >= 0, target, bounds.numel()), False)
    return ((size < filter_eps) & free[:-1].view_as(bounds)).to(torch.int8)
