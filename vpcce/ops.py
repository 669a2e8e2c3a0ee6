"""`linear_cross_entropy` as torch.library custom ops, for ``torch.compile`` and CUDA graphs.

The eager path cannot be traced without graph breaks: its setup synchronizes with the host (the
vocab-parallel layout collective, the CPU target-range check) and its `LossConfig` is a Python
object. Under ``torch.compile`` `linear_cross_entropy` calls one opaque op instead:

- ``vpcce::linear_cross_entropy(e, c, targets, bias, <options as primitives>)`` ->
  ``(loss, lse, entropy, argmax, z_target, valid, count, bounds)``; ``z_target`` (``[N]``, each
  token's target logit), ``valid`` (``[N]`` bool), ``count`` (int64 scalar) and ``bounds`` (the
  forward's tile bounds, ``[0, 0]`` when the backward skips nothing) are what the backward needs
  besides the inputs and the LSE.
- ``vpcce::linear_cross_entropy_backward(...)`` -> ``(grad_e, grad_c, grad_bias)``, its registered
  backward (an empty tensor stands for a gradient that is not needed).

Each has a fake implementation that gives the tracer shapes and dtypes (and raises the eager
call's argument errors at trace time). Both real implementations build the `LossConfig` with the
eager call's own `vpcce.api.loss_config` and run the bodies of the eager autograd Function
`_LinearCrossEntropy` on a plain context object, so compiled and eager calls compute the same
numbers with the same code.

Vocab parallel: the group travels by name (``ProcessGroup.group_name``; ``None``: the default
group) and is resolved when the op runs. CUDA graphs: after a first (warm-up) call has cached the
vocab-parallel layout check and any Triton autotuning, neither op synchronizes with the host (CUDA
target checks are ``torch._assert_async``), so a step that calls them can be captured.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from vpcce.function import LossConfig, _LinearCrossEntropy
from vpcce.parallel.options import VocabParallelOptions
from vpcce.partials import stats_dtype
from vpcce.validation import check_inputs

# vocab_parallel_options=None travels as vp_start = vp_stop = _NO_VP
_NO_VP = -1


class _Context:
    """The attributes of an autograd context that `_LinearCrossEntropy` forward / backward use."""

    def __init__(self, cfg: LossConfig, saved=(), needs_input_grad=()):
        self.cfg = cfg
        self.saved_tensors = saved
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value: bool):
        pass


def _group(name: str | None):
    return None if name is None else dist.distributed_c10d._resolve_process_group(name)


# The options after (e, c, targets, bias), in the ops' argument order: `loss_config`'s keyword
# arguments (but ``validate``), then `VocabParallelOptions` (``vp_start == _NO_VP``: None).
_LOSS_OPTIONS = (
    "impl", "filter_eps", "filter_e_grad", "filter_c_grad", "accum_e_fp32", "accum_c_fp32",
    "shift", "ignore_index", "reduction", "label_smoothing", "logit_scale", "softcap",
    "chunk_bytes",
)  # fmt: skip
_VP_OPTIONS = (
    "vp_start", "vp_stop", "vp_group", "reduce_e_grad", "sequence_parallel", "reduce_dtype",
)  # fmt: skip
_OPTION_NAMES = _LOSS_OPTIONS + _VP_OPTIONS


def _vp(start, stop, group_name, reduce_e_grad, sequence_parallel, reduce_dtype):
    if start == _NO_VP:
        return None
    return VocabParallelOptions(
        start,
        stop,
        _group(group_name),
        reduce_e_grad=reduce_e_grad,
        sequence_parallel=sequence_parallel,
        reduce_dtype=reduce_dtype,
    )


def _config(e, c, targets, bias, a: dict, validate: bool, *, stats: bool) -> LossConfig:
    """The eager call's `LossConfig` from an op's arguments ``a`` (by name)."""
    from vpcce.api import loss_config  # api imports this module

    vp = _vp(*(a[k] for k in _VP_OPTIONS))
    options = {k: a[k] for k in _LOSS_OPTIONS}
    return loss_config(e, c, targets, bias, vp, validate=validate, stats=stats, **options)


@torch.library.custom_op("vpcce::linear_cross_entropy", mutates_args=())
def _forward_op(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    impl: str,
    filter_eps: float | None,
    filter_e_grad: bool,
    filter_c_grad: bool,
    accum_e_fp32: bool,
    accum_c_fp32: bool,
    shift: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    logit_scale: float,
    softcap: float | None,
    chunk_bytes: int | None,
    vp_start: int,
    vp_stop: int,
    vp_group: str | None,
    reduce_e_grad: bool,
    sequence_parallel: bool,
    reduce_dtype: torch.dtype,
    validate: bool,
    stats_used: bool,
    lse_used: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor,
]:  # fmt: skip
    # stats_used: whether the caller asked for the entropy and argmax (`LossConfig.stats`);
    # lse_used: whether it asked for the LSE (else its gradient is autograd's zeros)
    a = locals()
    cfg = _config(e, c, targets, bias, a, validate, stats=stats_used)
    ctx = _Context(cfg)
    loss, lse, entropy, argmax = _LinearCrossEntropy.forward(ctx, e, c, bias, targets, cfg)
    # (the tail's two tensors are None here: the op's mode has no tail, `_forward_op`)
    z_target, valid, count, bounds = ctx.saved_tensors[5:9]
    return loss, lse, entropy, argmax, z_target, valid, count, _bounds_out(bounds, e)


def _bounds_out(bounds: torch.Tensor | None, e: torch.Tensor) -> torch.Tensor:
    """The tile bounds as an op output: ``[0, 0]`` stands for none (the backward skips nothing)."""
    return e.new_empty((0, 0), dtype=torch.float32) if bounds is None else bounds


def _bounds_in(bounds: torch.Tensor) -> torch.Tensor | None:
    return None if bounds.numel() == 0 else bounds


def _bounds_shape(e, c, targets, bias, a: dict) -> tuple[int, int]:
    """`_bounds_out`'s shape, decided from the options as `_LinearCrossEntropy.forward` does."""
    from vpcce.function import uses_tile_summaries
    from vpcce.modes import BackwardMode, resolve_impl

    flags = (a[k] for k in ("filter_e_grad", "filter_c_grad", "accum_e_fp32", "accum_c_fp32"))
    mode = BackwardMode(a["filter_eps"], *flags)
    impl, mode = resolve_impl(a["impl"], e.device, mode, e.dtype)
    n = math.prod(_out_shape(targets, a["shift"]))
    if not uses_tile_summaries(impl, mode, c.dtype, bias is not None, n, c.shape[0]):
        return (0, 0)
    from vpcce.kernels.tile_summary import bounds_shape

    return bounds_shape(n, c.shape[0], c.dtype)


def _out_shape(targets: torch.Tensor, shift: int) -> tuple[int, ...]:
    """Per-token output shape (`vpcce.layout.make_layout`): targets hold the gathered tokens."""
    return (*targets.shape[:-1], targets.shape[-1] - shift) if targets.dim() else ()


def _check(e, c, targets, bias, a: dict) -> None:
    group = _group(a["vp_group"])
    sp_world = dist.get_world_size(group) if a["sequence_parallel"] else 1
    check_inputs(
        e,
        c,
        targets,
        bias,
        shift=a["shift"],
        ignore_index=a["ignore_index"],
        reduction=a["reduction"],
        label_smoothing=a["label_smoothing"],
        softcap=a["softcap"],
        logit_scale=a["logit_scale"],
        sequence_parallel_world=sp_world,
    )


@_forward_op.register_fake
def _forward_fake(e, c, targets, bias, *options):
    a = dict(zip(_OPTION_NAMES, options, strict=False))
    _check(e, c, targets, bias, a)
    shape = _out_shape(targets, a["shift"])
    dtype = stats_dtype(e.dtype)
    loss = e.new_empty(shape if a["reduction"] == "none" else (), dtype=dtype)
    per_token = [e.new_empty(shape, dtype=dtype), e.new_empty(shape, dtype=dtype)]
    argmax = e.new_empty(shape, dtype=torch.int64)
    z_target = e.new_empty((math.prod(shape),), dtype=dtype)
    valid = e.new_empty((math.prod(shape),), dtype=torch.bool)
    count = e.new_empty((), dtype=torch.int64)
    bounds = e.new_empty(_bounds_shape(e, c, targets, bias, a), dtype=torch.float32)
    return loss, *per_token, argmax, z_target, valid, count, bounds


@torch.library.custom_op("vpcce::linear_cross_entropy_backward", mutates_args=())
def _backward_op(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    z_target: torch.Tensor,
    valid: torch.Tensor,
    count: torch.Tensor,
    bounds: torch.Tensor,
    grad_loss: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    need_e: bool,
    need_c: bool,
    need_bias: bool,
    impl: str,
    filter_eps: float | None,
    filter_e_grad: bool,
    filter_c_grad: bool,
    accum_e_fp32: bool,
    accum_c_fp32: bool,
    shift: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    logit_scale: float,
    softcap: float | None,
    chunk_bytes: int | None,
    vp_start: int,
    vp_stop: int,
    vp_group: str | None,
    reduce_e_grad: bool,
    sequence_parallel: bool,
    reduce_dtype: torch.dtype,
    stats_used: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = locals()
    # the forward checked the targets; its stats_used too, so the layout check finds the
    # forward's entry (the option fingerprint includes it)
    cfg = _config(e, c, targets, bias, a, validate=False, stats=stats_used)
    saved = (
        e, c, bias, targets, lse.reshape(-1), z_target, valid, count, _bounds_in(bounds), None,
        None,
    )  # fmt: skip
    ctx = _Context(cfg, saved, (need_e, need_c, need_bias and bias is not None))
    grad_e, grad_c, grad_bias, _, _ = _LinearCrossEntropy.backward(
        ctx, grad_loss, grad_lse, None, None
    )
    # an op returns tensors only, none aliasing another: a new empty one means "no gradient"
    return tuple(e.new_empty(0) if g is None else g for g in (grad_e, grad_c, grad_bias))


@_backward_op.register_fake
def _backward_fake(
    e, c, targets, bias, lse, z_target, valid, count, bounds, grad_loss, grad_lse, need_e, need_c,
    need_bias, *options,
):  # fmt: skip
    need_bias = need_bias and bias is not None
    return (
        torch.empty_like(e) if need_e else e.new_empty(0),
        torch.empty_like(c) if need_c else e.new_empty(0),
        torch.empty_like(bias) if need_bias else e.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    e, c, targets, bias, *options = inputs
    _, lse, entropy, _, z_target, valid, count, bounds = output
    ctx.save_for_backward(e, c, targets, bias, lse, z_target, valid, count, bounds)
    # the backward op's options (not validate, lse_used; stats_used goes last)
    ctx.options = options[: len(_OPTION_NAMES)]
    ctx.stats_used, ctx.lse_used = options[-2:]
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(entropy, z_target, bounds)


def _backward(ctx, grad_loss, grad_lse, _grad_entropy, _grad_argmax, *_grad_saved):
    # (_grad_saved: of z_target, valid, count and bounds, none of them differentiable)
    e, c, targets, bias, lse, z_target, valid, count, bounds = ctx.saved_tensors
    need_e, need_c, _, need_bias = ctx.needs_input_grad[:4]
    grads = torch.ops.vpcce.linear_cross_entropy_backward(
        e,
        c,
        targets,
        bias,
        lse,
        z_target,
        valid,
        count,
        bounds,
        grad_loss,
        grad_lse if ctx.lse_used else None,
        need_e,
        need_c,
        need_bias,
        *ctx.options,
        ctx.stats_used,
    )
    grad_e, grad_c, grad_bias = (
        g if need else None for g, need in zip(grads, (need_e, need_c, need_bias), strict=True)
    )
    return grad_e, grad_c, None, grad_bias, *([None] * (ctx.num_inputs - 4))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    e,
    c,
    targets,
    bias,
    vp: VocabParallelOptions | None,
    *,
    lse_used: bool,
    stats_used: bool,
    ignore_index,
    softcap,
    reduction,
    shift,
    filter_eps,
    accum_e_fp32,
    accum_c_fp32,
    filter_e_grad,
    filter_c_grad,
    impl,
    label_smoothing,
    logit_scale,
    validate,
    chunk_bytes,
):
    """`vpcce.api.linear_cross_entropy`'s loss, LSE, entropy and argmax through the custom op.

    Options become primitives here (traced by dynamo); ``filter_eps="auto"`` is resolved first
    because an op argument has one type.
    """
    from vpcce.modes import resolve_filter_eps

    group_name = None
    if vp is not None and vp.group is not None:
        group_name = vp.group.group_name
    loss, lse, entropy, argmax, *_ = _forward_op(
        e,
        c,
        targets,
        bias,
        impl,
        resolve_filter_eps(filter_eps),
        bool(filter_e_grad),
        bool(filter_c_grad),
        bool(accum_e_fp32),
        bool(accum_c_fp32),
        shift,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(logit_scale),
        None if softcap is None else float(softcap),
        chunk_bytes,
        _NO_VP if vp is None else vp.start,
        _NO_VP if vp is None else vp.stop,
        group_name,
        True if vp is None else vp.reduce_e_grad,
        False if vp is None else vp.sequence_parallel,
        torch.float32 if vp is None else vp.reduce_dtype,
        bool(validate),
        bool(stats_used),
        bool(lse_used),
    )
    return loss, lse, entropy, argmax
