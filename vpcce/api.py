"""Public entry points: `linear_cross_entropy` and the `LinearCrossEntropy` module.

The call is a superset of apple cut_cross_entropy's ``linear_cross_entropy``, so existing callers
switch by changing the import.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import os
import zlib
from typing import NamedTuple

import torch
from torch import nn

from vpcce import ops
from vpcce.function import LossConfig, _LinearCrossEntropy
from vpcce.modes import BackwardMode, resolve_filter_eps, resolve_impl, tail_options
from vpcce.parallel import collectives
from vpcce.parallel.options import VocabParallelOptions
from vpcce.validation import check_inputs, check_target_range, is_integer, is_number

# Tensor types that are never DTensors (the fast path skips the DTensor adapter's import).
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


class TokenStats(NamedTuple):
    """Per-token statistics computed by the same pass as the loss (no logits needed).

    ``entropy``: fp32 entropy of the predicted distribution (nats); ``argmax``: int64 top-1
    vocabulary id; ``correct``: bool, top-1 equals the target (False for ignored tokens).
    """

    entropy: torch.Tensor
    argmax: torch.Tensor
    correct: torch.Tensor


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool | int = 0,
    return_lse: bool = False,
    filter_eps: float | str | None = "auto",
    accum_e_fp32: bool = False,
    accum_c_fp32: bool = False,
    filter_e_grad: bool = True,
    filter_c_grad: bool = True,
    impl: str = "auto",
    vocab_parallel_options: VocabParallelOptions | None = None,
    *,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    validate: bool = True,
    chunk_bytes: int | None = None,
):
    """Cross-entropy of ``softcap(logit_scale * (e @ c.T + bias))`` without materializing logits.

    Args:
        e: ``[..., T, D]`` hidden states (fp32 / bf16 / fp16). Under sequence parallelism, this
            rank's ``[N / W, ..., D]`` slice along dim 0.
        c: ``[V, D]`` classifier (this rank's ``[stop - start, D]`` shard when vocab-parallel).
        targets: ``e.shape[:-1]`` integer ids (global ids when vocab-parallel; under sequence
            parallelism, the shape of the gathered ``e``).
        bias: optional ``[V]`` bias (this rank's shard when vocab-parallel).
        ignore_index: targets equal to it contribute 0 and are excluded from the mean.
        softcap: ``s`` in ``s * tanh(x / s)`` applied to the logits (Gemma 2), or None.
        reduction: ``"mean"`` over non-ignored tokens, ``"sum"``, or ``"none"``
            (``(..., T - shift)``).
        shift: pair ``e[..., :-shift, :]`` with ``targets[..., shift:]`` (views, no copy).
        return_lse: also return the per-token fp32 log-sum-exp (differentiable, e.g. for z-loss).
        filter_eps: ``"auto"`` (keeps the materialized baseline's accuracy: the Triton backward
            skips the softmax tail's tiles and adds their first-order contribution where a
            sample of tokens shows that beating the baseline, else exact;
            `vpcce.modes.BackwardMode.tail_share`; exact under torch.compile), ``"tail"`` (the
            same, unchecked), ``None`` (exact) or a float: skip gradient tiles whose every
            ``|softmax - smoothed one-hot|`` is below it.
        accum_e_fp32, accum_c_fp32: accumulate that gradient in an fp32 buffer (more memory).
        filter_e_grad, filter_c_grad: whether ``filter_eps`` may skip work for that gradient.
        impl: ``"auto"``, ``"torch"``, ``"triton"`` or an apple name (see `vpcce.modes`).
        vocab_parallel_options: shard layout and group for vocabulary parallelism.
        label_smoothing: PyTorch's label smoothing over the full (global) vocabulary.
        logit_scale: multiplies ``e @ c.T + bias`` before the softcap (MuP output multiplier).
        return_stats: also return `TokenStats` (entropy, top-1 id, top-1 correct) per token.
        validate: check that targets lie in ``[0, V)`` (eager on CPU; a device-side assert
            without host synchronization on accelerators).
        chunk_bytes: working-memory budget of ``impl="torch"`` (default 256 MiB).

    Returns:
        ``loss`` (fp32; a scalar, or per token for ``reduction="none"``), followed by ``lse``
        (``(..., T - shift)`` fp32) if ``return_lse`` and by `TokenStats` if ``return_stats``.
    """
    # 1. DTensor inputs (a classifier sharded over a device mesh): the adapter turns the mesh
    # layout into VocabParallelOptions and calls back with local tensors (integrations.dtensor)
    options = dict(
        ignore_index=ignore_index, softcap=softcap, reduction=reduction, shift=shift,
        filter_eps=filter_eps, accum_e_fp32=accum_e_fp32, accum_c_fp32=accum_c_fp32,
        filter_e_grad=filter_e_grad, filter_c_grad=filter_c_grad, impl=impl,
        label_smoothing=label_smoothing, logit_scale=logit_scale, validate=validate,
        chunk_bytes=chunk_bytes,
    )
    plain = all(x is None or type(x) in _PLAIN_TENSOR_TYPES for x in (e, c, targets, bias))
    if not plain and torch.distributed.is_available():
        from vpcce.integrations import dtensor

        if dtensor.any_dtensor(e, c, targets, bias):
            return dtensor.linear_cross_entropy(
                linear_cross_entropy, e, c, targets, bias, vocab_parallel_options,
                return_lse=return_lse, return_stats=return_stats, **options,
            )
    # plain Python scalars from here on (bool shift is 0 or 1; NumPy scalars as for F.cross_entropy)
    shift = options["shift"] = int(shift) if isinstance(shift, numbers.Integral) else shift
    if is_integer(ignore_index):
        ignore_index = options["ignore_index"] = int(ignore_index)
    for name in ("label_smoothing", "logit_scale", "softcap"):
        value = options[name]
        if is_number(value):
            options[name] = float(value)
    vp = vocab_parallel_options
    if vp is not None and not isinstance(vp, VocabParallelOptions):
        got = type(vp).__name__
        raise TypeError(f"vocab_parallel_options must be VocabParallelOptions, got {got}")
    # 2. the loss: the autograd Function, or under torch.compile one opaque custom op (vpcce.ops)
    # whose implementation runs the same configuration and Function bodies when the graph runs.
    # autocast stays outside, as for F.cross_entropy: the inputs keep their dtypes, and the
    # fp32 tile products of the implementations stay fp32 (a non-tensor e fails validation).
    device_type = e.device.type if isinstance(e, torch.Tensor) else "cpu"
    with _autocast_off(device_type):
        if torch.compiler.is_compiling():
            loss, lse, entropy, argmax = ops.linear_cross_entropy(
                e, c, targets, bias, vp, lse_used=return_lse, stats_used=return_stats, **options
            )
        else:
            cfg = loss_config(e, c, targets, bias, vp, stats=bool(return_stats), **options)
            loss, lse, entropy, argmax = _LinearCrossEntropy.apply(e, c, bias, targets, cfg)

    # 3. outputs
    out = [loss]
    if return_lse:
        out.append(lse)
    if return_stats:
        y = targets[..., shift:] if targets.dim() else targets
        correct = (argmax == y) & (y != ignore_index)
        out.append(TokenStats(entropy, argmax, correct))
    return out[0] if len(out) == 1 else tuple(out)


def _autocast_off(device_type: str):
    """Autocast off for the call, or nothing to do when it is off already (entering
    ``torch.autocast`` is host time before the forward's launch)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def loss_config(
    e, c, targets, bias, vp: VocabParallelOptions | None, *, ignore_index, softcap, reduction,
    shift, filter_eps, accum_e_fp32, accum_c_fp32, filter_e_grad, filter_c_grad, impl,
    label_smoothing, logit_scale, validate, chunk_bytes, stats=True,
) -> LossConfig:
    """Validate the arguments of `linear_cross_entropy` and resolve them into a `LossConfig`.

    Shared by the eager call and the torch.compile custom op (`vpcce.compile`), which runs it at
    execution time: the vocab-parallel layout check (a collective, the first time a layout is
    seen) and the CPU target check synchronize with the host, which a traced graph must not.
    """
    # 1. normalize and validate
    world = 1 if vp is None else collectives.world_size(vp)
    sp_world = world if vp is not None and vp.sequence_parallel else 1
    check_inputs(
        e, c, targets, bias, shift=shift, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale,
        sequence_parallel_world=sp_world,
    )
    mode = BackwardMode(
        resolve_filter_eps(filter_eps), bool(filter_e_grad), bool(filter_c_grad),
        bool(accum_e_fp32), bool(accum_c_fp32), **tail_options(filter_eps),
    )
    backend, mode = resolve_impl(impl, e.device, mode, e.dtype)
    if backend == "triton" and e.device.type != "cuda" and os.getenv("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl={impl!r} runs the Triton kernels: it needs CUDA tensors or TRITON_INTERPRET=1, "
            f"got {e.device}"
        )
    softcap = None if softcap is None else float(softcap)

    # 2. vocabulary layout (one small collective the first time a vocab-parallel layout is seen)
    vocab_size, vocab_start = c.shape[0], 0
    if vp is not None:
        num_tokens = targets[..., shift:].numel() if targets.dim() else 1
        fingerprint = zlib.crc32(
            repr((reduction, shift, ignore_index, float(label_smoothing), softcap,
                  float(logit_scale), vp.sequence_parallel, vp.reduce_e_grad,
                  str(vp.reduction_dtype(e.dtype)), bias is not None, bool(stats),
                  str(e.dtype))).encode()
        )
        vocab_size = collectives.verify_layout(vp, num_tokens, fingerprint, c.shape[0], e.device)
        vocab_start = vp.start
    # The targets that are read: those a shift pairs with a hidden state. The CUDA kernels index
    # no memory by a target outside the shard, so there the device-side check waits until the
    # forward's kernel is queued (`vpcce.function`), which then starts sooner: the check is ~8
    # small ops, ~0.3 ms of host time (H200, docs/perf.md round 25).
    check_later = validate and backend == "triton" and e.device.type == "cuda"
    if validate and not check_later:
        checked = targets[..., shift:] if targets.dim() else targets
        check_target_range(checked, vocab_size, ignore_index)

    return LossConfig(
        impl=backend, mode=mode, shift=shift, ignore_index=int(ignore_index), reduction=reduction,
        label_smoothing=float(label_smoothing), logit_scale=float(logit_scale), softcap=softcap,
        vocab_size=vocab_size, vocab_start=vocab_start, vp=vp, chunk_bytes=chunk_bytes,
        stats=stats, check_targets=check_later,
    )


_MODULE_OPTIONS = set(inspect.signature(linear_cross_entropy).parameters)
_MODULE_OPTIONS -= {"e", "c", "targets", "bias"}  # the operands


class LinearCrossEntropy(nn.Module):
    """`linear_cross_entropy` as a module; the constructor takes the same options."""

    def __init__(self, **options):
        super().__init__()
        unknown = set(options) - _MODULE_OPTIONS
        if unknown:
            raise TypeError(
                f"LinearCrossEntropy got unknown options {sorted(unknown)}; "
                f"valid: {sorted(_MODULE_OPTIONS)}"
            )
        self.options = options

    def forward(self, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None):  # fmt: skip
        return linear_cross_entropy(e, c, targets, bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
