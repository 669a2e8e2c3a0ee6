"""fp64 truth and materialized baselines for `linear_cross_entropy` tests.

`truth` upcasts the inputs to fp64 and follows PyTorch's semantics step by step (materialized fp64
logits, ``F.cross_entropy``), so it shares no code with ``vpcce``. `bf16_baseline` is what a caller
would write without vpcce: logits materialized in the input dtype, then ``.float()`` and
``F.cross_entropy``. Low-precision tests hold the reference to the baseline's error against the
truth.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Result(NamedTuple):
    """Loss (reduced, or per token ``(..., T - shift)``), per-token LSE and input gradients.

    The gradients are those of ``objective(loss, lse, valid)`` (see `objective`).
    """

    loss: torch.Tensor
    lse: torch.Tensor
    de: torch.Tensor | None
    dc: torch.Tensor | None
    dbias: torch.Tensor | None


def paired(e: torch.Tensor, targets: torch.Tensor, shift: int):
    """``e[..., :-shift, :]`` with ``targets[..., shift:]`` (PyTorch's next-token shift)."""
    if not shift:
        return e, targets
    return e[..., :-shift, :], targets[..., shift:]


def logits_of(e, c, bias, *, softcap, logit_scale):
    """``softcap * tanh(logit_scale * (e @ c.T + bias) / softcap)`` in the inputs' dtype."""
    z = e @ c.T
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def objective(loss, lse, valid, *, reduction, z_loss=0.0, grad_weight=None):
    """The scalar the tests differentiate: the loss (weighted by ``grad_weight`` when per token)
    plus the z-loss ``z_loss * sum(lse ** 2 over non-ignored tokens)``."""
    out = (
        loss
        if reduction != "none"
        else (loss * (1.0 if grad_weight is None else grad_weight)).sum()
    )
    if z_loss:
        out = out + z_loss * (lse.pow(2) * valid).sum()
    return out


def _reduce(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    # mean over non-ignored tokens; an all-ignored batch gives 0 (vpcce's contract, not NaN)
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total


def truth(
    e,
    c,
    targets,
    bias=None,
    *,
    ignore_index=-100,
    softcap=None,
    reduction="mean",
    shift=0,
    label_smoothing=0.0,
    logit_scale=1.0,
    z_loss=0.0,
    grad_weight=None,
    chunk_tokens=256,
) -> Result:
    """fp64 loss, LSE and gradients of the inputs as given (upcast, not regenerated).

    Logits are materialized in fp64 ``chunk_tokens`` tokens at a time over the full vocabulary.
    The loss is ``F.cross_entropy(..., ignore_index, label_smoothing)`` per token, reduced as
    vpcce does; gradients are of `objective` (``grad_weight`` weights a per-token loss).
    """
    e64 = e.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    ep, yp = paired(e64, targets, shift)
    out_shape = yp.shape
    x = ep.reshape(-1, ep.shape[-1])
    y = yp.reshape(-1).long()
    nll, lse = [], []
    for n0 in range(0, max(y.numel(), 1), chunk_tokens):  # N = 0 still runs one empty chunk
        z = logits_of(x[n0 : n0 + chunk_tokens], c64, b64, softcap=softcap, logit_scale=logit_scale)
        yc = y[n0 : n0 + chunk_tokens]
        nll.append(
            F.cross_entropy(
                z, yc, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
            )
        )
        lse.append(torch.logsumexp(z, dim=-1))
    nll, lse = torch.cat(nll), torch.cat(lse)
    valid = y != ignore_index
    loss = _reduce(nll.view(out_shape), valid.view(out_shape), reduction)
    lse = lse.view(out_shape)
    obj = objective(
        loss,
        lse,
        valid.view(out_shape),
        reduction=reduction,
        z_loss=z_loss,
        grad_weight=None if grad_weight is None else grad_weight.double(),
    )
    leaves = [t for t in (e64, c64, b64) if t is not None]
    grads = torch.autograd.grad(obj, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]
    return Result(
        loss.detach(), lse.detach(), grads[0], grads[1], grads[2] if b64 is not None else None
    )


def bf16_baseline(
    e,
    c,
    targets,
    bias=None,
    *,
    ignore_index=-100,
    softcap=None,
    reduction="mean",
    shift=0,
    label_smoothing=0.0,
    logit_scale=1.0,
    z_loss=0.0,
    grad_weight=None,
) -> Result:
    """The materialized baseline: logits in the input dtype (bias, scale and softcap too), then
    ``F.cross_entropy(logits.float(), y)``; gradients come back in the input dtype."""
    e_ = e.detach().clone().requires_grad_()
    c_ = c.detach().clone().requires_grad_()
    b_ = None if bias is None else bias.detach().clone().requires_grad_()
    ep, yp = paired(e_, targets, shift)
    x = ep.reshape(-1, ep.shape[-1])
    y = yp.reshape(-1).long()
    z = logits_of(x, c_, b_, softcap=softcap, logit_scale=logit_scale).float()
    nll = F.cross_entropy(
        z, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    lse = torch.logsumexp(z, dim=-1).view(yp.shape)
    valid = (y != ignore_index).view(yp.shape)
    loss = _reduce(nll.view(yp.shape), valid, reduction)
    obj = objective(loss, lse, valid, reduction=reduction, z_loss=z_loss, grad_weight=grad_weight)
    leaves = [t for t in (e_, c_, b_) if t is not None]
    grads = torch.autograd.grad(obj, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]
    return Result(
        loss.detach(), lse.detach(), grads[0], grads[1], grads[2] if b_ is not None else None
    )


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in fp64 (``||x||`` when ``ref`` is all zeros)."""
    x, ref = x.detach().double(), ref.detach().double()
    assert x.shape == ref.shape, (x.shape, ref.shape)
    denom = ref.norm()
    diff = (x - ref).norm()
    return float(diff / denom) if denom > 0 else float(x.norm())
