"""vpcce: vocabulary-parallel Cut Cross-Entropy.

The LM-head projection and the cross-entropy loss computed together, without materializing the
``[tokens x vocab]`` logits, optionally with the classifier sharded by vocabulary over a
torch.distributed group.
"""

from vpcce.api import LinearCrossEntropy, TokenStats, linear_cross_entropy
from vpcce.modes import BackwardMode
from vpcce.parallel import LayoutError, VocabParallelOptions

__all__ = [
    "BackwardMode",
    "LayoutError",
    "LinearCrossEntropy",
    "TokenStats",
    "VocabParallelOptions",
    "linear_cross_entropy",
]
__version__ = "0.1.0"
