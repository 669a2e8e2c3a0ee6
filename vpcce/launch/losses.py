"""The two loss paths the training demo compares, both vocabulary-parallel over one group.

``vpcce``: `vpcce.linear_cross_entropy` on this rank's classifier shard; no logits are stored.

``materialized``: what Megatron-Core does behind a ``ColumnParallelLinear(gather_output=False)``
(``tensor_parallel/mappings.py``, ``cross_entropy.py``), written out here so the CPU demo needs no
Megatron: the hidden states enter through an identity whose backward all-reduces their gradient,
each rank forms its ``[N, V / W]`` logits in fp32, and the cross-entropy needs three all-reduces
(max, target logit, sum of exponentials); the softmax ``[N, V / W]`` fp32 is kept for backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vpcce import VocabParallelOptions, linear_cross_entropy


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (Megatron's
    ``copy_to_tensor_model_parallel_region``): every rank's logits depend on the same input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous(), dist.ReduceOp.SUM, ctx.group), None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from this rank's ``[N, V_local]`` logits (Megatron's algorithm)."""

    @staticmethod
    def forward(ctx, logits, target, start, stop, group):
        # 1. global max, subtracted in place (as Megatron does, to hold one [N, V_local] buffer)
        logits = logits.float()
        logits_max = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
        logits.sub_(logits_max[:, None])
        # 2. the target's logit lives on one rank; the others contribute 0
        local = (target >= start) & (target < stop)
        idx = torch.where(local, target - start, torch.zeros_like(target))
        rows = torch.arange(logits.shape[0], device=logits.device)
        predicted = torch.where(local, logits[rows, idx], torch.zeros_like(logits_max))
        predicted = _all_reduce(predicted, dist.ReduceOp.SUM, group)
        # 3. softmax over the global vocabulary, kept for backward
        softmax = logits.exp_()
        sum_exp = _all_reduce(softmax.sum(dim=-1), dist.ReduceOp.SUM, group)
        loss = torch.log(sum_exp) - predicted
        softmax.div_(sum_exp[:, None])
        ctx.save_for_backward(softmax, local, idx)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, idx = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, idx] -= local.to(grad.dtype)
        grad.mul_(grad_loss[:, None])
        return grad, None, None, None, None


def materialized_loss(
    h: torch.Tensor, w_shard: torch.Tensor, targets: torch.Tensor, opts: VocabParallelOptions
) -> torch.Tensor:
    """Mean next-token loss of ``h [B, T, D]`` against ``targets [B, T]`` (global ids)."""
    x = _CopyToGroup.apply(h[:, :-1].reshape(-1, h.shape[-1]), opts.group)
    logits = x @ w_shard.T  # [N, V_local]: the buffer vpcce never builds
    y = targets[:, 1:].reshape(-1)
    return _VocabParallelCrossEntropy.apply(logits, y, opts.start, opts.stop, opts.group).mean()


def vpcce_loss(
    h: torch.Tensor,
    w_shard: torch.Tensor,
    targets: torch.Tensor,
    opts: VocabParallelOptions,
    **options,
) -> torch.Tensor:
    """The same loss through vpcce (``shift=1`` pairs ``h[:, :-1]`` with ``targets[:, 1:]``)."""
    return linear_cross_entropy(
        h, w_shard, targets, shift=1, vocab_parallel_options=opts, **options
    )


LOSSES = {"vpcce": vpcce_loss, "materialized": materialized_loss}
