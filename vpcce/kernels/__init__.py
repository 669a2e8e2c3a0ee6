"""Triton CCE kernels for one vocabulary shard (no collectives here).

The implementation interface shared with `vpcce.reference`: `forward_partials` returns the
``[N, 6]`` mergeable partials of `vpcce.partials`; `backward` writes the hidden-state gradient
and returns the shard's classifier and bias gradients. Only the kernels skip tiles: their forward
also fills `tile_max_buffer`, which `tile_bounds` turns into the backward's ``tile_bounds``.
"""

from vpcce.kernels.backward import backward
from vpcce.kernels.forward import forward_partials
from vpcce.kernels.tile_summary import tile_bounds, tile_max_buffer

__all__ = ["backward", "forward_partials", "tile_bounds", "tile_max_buffer"]
