"""Vocabulary parallelism over a torch.distributed ProcessGroup (collectives only, no Triton)."""

from vpcce.parallel.collectives import LayoutError
from vpcce.parallel.options import VocabParallelOptions, shard_range

__all__ = ["LayoutError", "VocabParallelOptions", "shard_range"]
