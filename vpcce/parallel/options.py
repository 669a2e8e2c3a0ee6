"""Which slice of the vocabulary this rank owns, and how its gradients are reduced."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in ``group``; a process without torch.distributed is rank 0 of 1."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous split of ``[0, vocab_size)``; the remainder goes to the first ranks."""
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class VocabParallelOptions:
    """This rank holds classifier rows for global vocabulary ids ``[start, stop)``.

    ``group``: the ranks that share the vocabulary (``None``: the default group).
    ``reduce_e_grad``: sum the hidden-state gradient over the group (``False`` leaves each rank's
    partial gradient, for frameworks that reduce it themselves).
    ``sequence_parallel``: hidden states arrive sharded along tokens (``[N / W, D]`` per rank, in
    rank order) with full targets; forward all-gathers them and backward reduce-scatters their
    gradient.
    ``reduce_dtype``: dtype of the hidden-gradient reduction (fp32 default; bf16 halves the bytes)
    for 16- and 32-bit inputs; fp64 inputs are reduced in fp64 (`reduction_dtype`).
    """

    start: int
    stop: int
    group: dist.ProcessGroup | None = None
    reduce_e_grad: bool = True
    sequence_parallel: bool = False
    reduce_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if not (0 <= self.start <= self.stop):
            raise ValueError(
                f"VocabParallelOptions needs 0 <= start <= stop, got {self.start}, {self.stop}"
            )
        if self.sequence_parallel and not self.reduce_e_grad:
            raise ValueError(
                "sequence_parallel=True needs reduce_e_grad=True: the hidden gradient is "
                "reduce-scattered back to each rank's token slice"
            )
        if self.reduce_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"reduce_dtype must be fp32, bf16 or fp16, got {self.reduce_dtype}")

    def reduction_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype the hidden gradient of ``input_dtype`` inputs is summed in."""
        return torch.float64 if input_dtype == torch.float64 else self.reduce_dtype

    @classmethod
    def from_vocab(cls, vocab_size: int, group: dist.ProcessGroup | None = None, **kwargs):
        """Contiguous near-equal shards, remainder to the first ranks (apple's layout)."""
        rank, world = group_rank_and_size(group)
        start, stop = shard_range(vocab_size, rank, world)
        return cls(start, stop, group, **kwargs)

    @classmethod
    def from_megatron(
        cls, padded_vocab_size: int, group: dist.ProcessGroup | None = None, **kwargs
    ):
        """Megatron's ``VocabUtility`` layout: equal shards of an already padded vocabulary."""
        rank, world = group_rank_and_size(group)
        if padded_vocab_size % world:
            raise ValueError(
                f"padded_vocab_size {padded_vocab_size} is not divisible by the group size "
                f"{world}; "
                "Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * tp"
            )
        per_rank = padded_vocab_size // world
        return cls(rank * per_rank, (rank + 1) * per_rank, group, **kwargs)

    @property
    def shard_size(self) -> int:
        return self.stop - self.start
