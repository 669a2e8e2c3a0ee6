"""Triton CCE kernels for one vocabulary shard (no collectives here).

The implementation interface shared with `vpcce.reference`: `forward_partials` returns the
``[N, 6]`` mergeable partials of `vpcce.partials`; `backward` writes the hidden-state gradient
and returns the shard's classifier and bias gradients.
"""

from vpcce.kernels.backward import backward
from vpcce.kernels.forward import forward_partials

__all__ = ["backward", "forward_partials"]
