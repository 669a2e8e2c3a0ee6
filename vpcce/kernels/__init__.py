"""Triton CCE kernels for one vocabulary shard (no collectives here).

The implementation interface shared with `vpcce.reference`: `forward_partials` returns the
``[N, 6]`` mergeable partials of `vpcce.partials`; `backward` writes the hidden-state gradient
and returns the shard's classifier and bias gradients. Only the kernels skip tiles: their forward
also fills `tile_max_buffer`, which `tile_bounds` turns into the backward's ``tile_bounds``, or
`tile_lse_buffer`, which `tail_plan` turns into the backward's ``tail`` (`vpcce.kernels.tail`).
"""

from vpcce.kernels.backward import backward
from vpcce.kernels.forward import forward_partials
from vpcce.kernels.tail import plan as tail_plan
from vpcce.kernels.tile_summary import tile_bounds, tile_lse_buffer, tile_max_buffer

__all__ = [
    "backward", "forward_partials", "tail_plan", "tile_bounds", "tile_lse_buffer",
    "tile_max_buffer",
]  # fmt: skip
