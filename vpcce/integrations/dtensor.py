"""DTensor inputs of `linear_cross_entropy`: the vocabulary layout read from the device mesh.

`vpcce.linear_cross_entropy` hands any call with a DTensor argument to `linear_cross_entropy` here,
which maps the placements to plain local tensors and `VocabParallelOptions`, and calls back:

=====================================  ========================================================
argument                               meaning
=====================================  ========================================================
``c`` ``Shard(0)`` on a 1-D mesh       vocab parallel over the mesh's group; this rank owns the
                                       rows DTensor gives it (``torch.chunk``: ``ceil(V / W)``
                                       rows per rank, the last ones shorter)
``c`` ``Replicate()``                  a plain classifier (its local tensor)
``bias``                               a DTensor with ``c``'s mesh and placement
``e``, ``targets``                     plain tensors, or ``Replicate()`` DTensors
anything else                          ``ValueError`` naming the argument and its placements
=====================================  ========================================================

Gradients reach DTensor inputs as DTensors with the inputs' placements (``to_local`` is
differentiable); the outputs are plain tensors, equal on every rank of the mesh.

A ``Shard(0)`` classifier means the ranks of its mesh hold the same tokens (tensor parallelism).
FSDP2's sharded parameters are ``Shard(0)`` DTensors too, but over data-parallel ranks that hold
different tokens: read the weight inside its module's forward, where FSDP2 has gathered it (as
`vpcce.integrations.transformers` does), never ``module.weight`` from outside.
"""

from __future__ import annotations

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch 2.4: DTensor was not public yet
    from torch.distributed._tensor import DTensor, Replicate, Shard

from vpcce.parallel.options import VocabParallelOptions


def any_dtensor(*tensors) -> bool:
    return any(isinstance(t, DTensor) for t in tensors)


def _placements(name: str, x: DTensor) -> str:
    return f"{name} is a DTensor with placements {tuple(x.placements)} on {x.device_mesh}"


def _replicated(name: str, x):
    """The local tensor of a replicated DTensor (a plain tensor passes through)."""
    if not isinstance(x, DTensor):
        return x
    if not all(isinstance(p, Replicate) for p in x.placements):
        raise ValueError(
            f"{_placements(name, x)}; {name} must be a plain tensor or a Replicate() DTensor"
        )
    return x.to_local()


def _vocab_shard(c: DTensor) -> VocabParallelOptions:
    """This rank's ``[start, stop)`` of a ``Shard(0)`` classifier and the mesh's group."""
    mesh = c.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    vocab = c.shape[0]
    chunk = -(-vocab // world)  # torch.chunk: ceil(V / W) rows per rank, the last ones shorter
    if chunk * (world - 1) >= vocab:  # the same on every rank: all raise, none hangs
        raise ValueError(
            f"c is a Shard(0) DTensor of {vocab} rows over {world} ranks: DTensor leaves the "
            "last rank(s) without rows, and every vocab-parallel rank needs at least one"
        )
    start = min(rank * chunk, vocab)
    stop = min(start + chunk, vocab)
    local_rows = c.to_local().shape[0]
    if local_rows != stop - start:
        raise ValueError(
            f"c is a Shard(0) DTensor whose local shard on mesh rank {rank} has {local_rows} rows; "
            f"torch.chunk's layout gives [{start}, {stop}) ({stop - start} rows)"
        )
    return VocabParallelOptions(start, stop, mesh.get_group())


def linear_cross_entropy(call, e, c, targets, bias, vocab_parallel_options, **kwargs):
    """``call`` (`vpcce.linear_cross_entropy`) on local tensors, vocab parallel for ``Shard(0)``."""
    if vocab_parallel_options is not None:
        raise ValueError(
            "vocab_parallel_options must be None when an argument is a DTensor: the vocabulary "
            f"layout comes from the device mesh (got {vocab_parallel_options})"
        )
    vp = None
    if isinstance(c, DTensor):
        if (
            c.device_mesh.ndim != 1
            or not isinstance(c.placements[0], (Shard, Replicate))
            or (isinstance(c.placements[0], Shard) and c.placements[0].dim != 0)
        ):
            raise ValueError(
                f"{_placements('c', c)}; vpcce takes a classifier sharded Shard(0) "
                "(vocab parallel) or Replicate() on a 1-D mesh"
            )
        if bias is not None and not (
            isinstance(bias, DTensor)
            and bias.device_mesh == c.device_mesh
            and tuple(bias.placements) == tuple(c.placements)
        ):
            got = (
                _placements("bias", bias) if isinstance(bias, DTensor) else "bias is a plain tensor"
            )
            raise ValueError(
                f"{got}; with a DTensor c it must be a DTensor on c's mesh with placements "
                f"{tuple(c.placements)}"
            )
        if isinstance(c.placements[0], Shard):
            vp = _vocab_shard(c)
        c = c.to_local()
        bias = None if bias is None else bias.to_local()
    elif isinstance(bias, DTensor):
        raise ValueError(f"{_placements('bias', bias)}; a DTensor bias needs a DTensor c")
    e = _replicated("e", e)
    targets = _replicated("targets", targets)
    assert not any_dtensor(e, c, targets, bias)
    return call(e, c, targets, bias, vocab_parallel_options=vp, **kwargs)
