"""The autograd Function that joins a shard implementation with the vocab-parallel collectives.

Forward, in steps: (1) sequence parallel: gather the hidden states; (2) this shard's ``[N, 6]``
partials from the implementation; (3) vocab parallel: one all-gather of the partials, merged in
rank order; (4) finalize loss / LSE / entropy / argmax; (5) reduce; (6) save what backward needs.
Backward recomputes everything else from ``e``, ``c``, ``bias``, ``targets``, the ``[N]`` LSE
and target logit and, when it may skip tiles, the ``[N / BLOCK_N, V / BLOCK_V]`` tile bounds of
the forward.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from vpcce.layout import gradient_layout, make_layout
from vpcce.modes import BackwardMode
from vpcce.parallel import collectives
from vpcce.parallel.options import VocabParallelOptions
from vpcce.partials import ZTARGET, finalize, merge_partials
from vpcce.validation import check_target_range

_BACKEND_MODULES = {"torch": "vpcce.reference", "triton": "vpcce.kernels"}


@dataclass(frozen=True)
class LossConfig:
    """Everything but the tensors; hashable so it can travel through autograd."""

    impl: str  # "torch" | "triton"
    mode: BackwardMode
    shift: int
    ignore_index: int
    reduction: str
    label_smoothing: float
    logit_scale: float
    softcap: float | None
    vocab_size: int  # global vocabulary size
    vocab_start: int
    vp: VocabParallelOptions | None
    chunk_bytes: int | None
    # whether the entropy and argmax outputs are read (`return_stats`): the forward skips the
    # partials only they need when not
    stats: bool = True
    # whether the forward checks the targets' range once its kernels are queued
    # (`vpcce.api.loss_config`)
    check_targets: bool = False

    @property
    def backend(self):
        return importlib.import_module(_BACKEND_MODULES[self.impl])

    def extra(self) -> dict:
        return {} if self.chunk_bytes is None else {"chunk_bytes": self.chunk_bytes}

    @property
    def sequence_parallel(self) -> bool:
        return self.vp is not None and self.vp.sequence_parallel


def uses_tile_summaries(
    impl: str,
    mode: BackwardMode,
    dtype: torch.dtype,
    has_bias: bool,
    num_tokens: int,
    vocab: int,
    softcap: float | None = None,
) -> str | None:
    """Which per-tile summary the forward keeps for the backward to skip tiles unseen: ``"max"``
    (each token's largest logit per vocabulary tile, for a float ``filter_eps``), ``"lse"`` (its
    log-sum-exp, for the tail of ``filter_eps="auto"``, `vpcce.kernels.tail`), or None.

    The Triton kernels keep one when a skipping rule applies to both gradients, there is no bias
    (its gradient sums every tile's dz, skipped or not) and their forward and backward tiles agree
    (`vpcce.kernels.tile_summary`); the tail also needs no softcap (its dz is not linear in the
    softmax); the reference never skips.
    """
    if impl != "triton" or has_bias or not (mode.filter_e_grad and mode.filter_c_grad):
        return None
    if mode.filter_eps is not None:
        kind = "max"
    elif mode.tail_share is not None and softcap is None:
        kind = "lse"
    else:
        return None
    from vpcce.kernels import tile_summary

    return kind if tile_summary.supported(dtype, num_tokens, vocab) else None


def _summary_kind(cfg: LossConfig, c: torch.Tensor, has_bias: bool, num_tokens: int) -> str | None:
    """`uses_tile_summaries` for this call. A checked tail (``"auto"``) needs none on a
    vocabulary shard: the check's baseline is a softmax over the whole vocabulary, which a shard
    alone cannot normalize (and the kernels make no collectives), so it stays exact there."""
    kind = uses_tile_summaries(
        cfg.impl, cfg.mode, c.dtype, has_bias, num_tokens, c.shape[0], cfg.softcap
    )
    if kind == "lse" and cfg.mode.tail_checked and _distributed(cfg):
        return None
    return kind


def _distributed(cfg: LossConfig) -> bool:
    return cfg.vp is not None and collectives.world_size(cfg.vp) > 1


def _hidden(e: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """All tokens' hidden states: gathered from the ranks under sequence parallelism."""
    return (
        collectives.gather_tokens(e, cfg.vp) if cfg.sequence_parallel and _distributed(cfg) else e
    )


def _without_autocast(backward):
    """Run ``backward`` with autocast off, as `vpcce.api` runs the forward.

    A backward called inside an autocast region (``with autocast(): loss.backward()``) would
    otherwise run the implementations' fp32 tile products in reduced precision.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return backward(ctx, *grads)

    return wrapper


class _GradientOfGradient(torch.autograd.Function):
    """Passes ``grad`` through, with ``inputs`` (those of the loss that require grad) as its own:
    differentiating the result with respect to any of them raises."""

    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "vpcce's linear_cross_entropy is not twice differentiable: the gradient of its "
            "gradient (create_graph=True, then a backward through that gradient) is not supported"
        )


def _once_differentiable(backward):
    """Run ``backward`` without recording a graph. With ``create_graph=True`` its gradients come
    back differentiable, and differentiating them raises (`_GradientOfGradient`): they depend on
    the inputs through saved tensors that a recorded graph would treat as constants, so a second
    derivative would be wrong. (``torch.autograd.function.once_differentiable`` marks them only when
    the incoming gradients require grad, which the usual seed, ``ones`` for the loss, does not,
    and not as functions of the inputs, so ``autograd.grad(..., e)`` would not reach the mark.)"""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        e_c_bias = ctx.saved_tensors[:3]
        inputs = [t for t in e_c_bias if t is not None and t.requires_grad]
        return tuple(g if g is None else _GradientOfGradient.apply(g, *inputs) for g in out)

    return wrapper


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, c, bias, targets, cfg: LossConfig):
        # 1. sequence parallel: this rank's tokens -> all tokens (re-gathered in backward, not kept)
        e_all = _hidden(e, cfg)
        layout = make_layout(e_all, targets, cfg.shift)
        # 2. partials over this shard of the vocabulary (and, to skip tiles in backward, each
        # token's largest logit or log-sum-exp per vocabulary tile)
        kind = _summary_kind(cfg, c, bias is not None, layout.num_tokens)
        summary = {}
        if kind == "max":
            summary["tile_max"] = cfg.backend.tile_max_buffer(layout.num_tokens, c)
        elif kind == "lse":
            summary["tile_lse"] = cfg.backend.tile_lse_buffer(layout.num_tokens, c)
        sum_z = cfg.label_smoothing != 0  # the mean logit: label smoothing's alone
        parts = cfg.backend.forward_partials(
            layout,
            c,
            bias,
            vocab_start=cfg.vocab_start,
            logit_scale=cfg.logit_scale,
            softcap=cfg.softcap,
            stats=cfg.stats,
            sum_z=sum_z,
            **cfg.extra(),
            **summary,
        )
        if cfg.check_targets:
            check_target_range(layout.y2, cfg.vocab_size, cfg.ignore_index)
        y = layout.flat_targets()
        valid = y != cfg.ignore_index
        # 3. the one forward collective: merge all shards' partials in rank order
        if _distributed(cfg):
            parts = merge_partials(
                collectives.gather_partials(parts, cfg.vp), stats=cfg.stats, sum_z=sum_z
            )
        # 4. per-token statistics over the global vocabulary (without `stats` their partials were
        # skipped: argmax -1 marks them, entropy 0)
        lse, nll, entropy, argmax = finalize(
            parts, cfg.vocab_size, cfg.label_smoothing, stats=cfg.stats
        )
        nll = torch.where(valid, nll, torch.zeros_like(nll))
        count = valid.sum()
        # the summary against the global LSE (then freed): a bound per backward tile, or the
        # tail's tiles and each token's mass in them
        bounds = tail_skip = tail_mass = None
        if kind == "max":
            bounds = cfg.backend.tile_bounds(summary.pop("tile_max"), lse, c.dtype)
        elif kind == "lse":
            tail_skip, tail_mass = cfg.backend.tail_plan(
                summary.pop("tile_lse"), lse, y, vocab_start=cfg.vocab_start, vocab=c.shape[0],
                vocab_size=cfg.vocab_size, share=cfg.mode.tail_share, dtype=c.dtype,
            )  # fmt: skip
        # 5. reduction (an all-ignored batch: 0 / max(0, 1) = 0, never NaN)
        if cfg.reduction == "mean":
            loss = nll.sum() / count.clamp(min=1)
        elif cfg.reduction == "sum":
            loss = nll.sum()
        else:
            loss = nll.view(layout.out_shape)
        # 6. save
        ctx.cfg = cfg
        # the target logit: the backward's target column of dz (`vpcce.kernels.target_dz`)
        z_target = parts[:, ZTARGET].contiguous()
        ctx.save_for_backward(
            e, c, bias, targets, lse, z_target, valid, count, bounds, tail_skip, tail_mass
        )
        ctx.mark_non_differentiable(entropy, argmax)
        ctx.set_materialize_grads(False)
        shape = layout.out_shape
        return loss, lse.view(shape), entropy.view(shape), argmax.view(shape)

    @staticmethod
    @_once_differentiable
    @_without_autocast
    def backward(ctx, grad_loss, grad_lse, _grad_entropy, _grad_argmax):
        e, c, bias, targets, lse, z_target, valid, count, bounds, *tail = ctx.saved_tensors
        cfg: LossConfig = ctx.cfg
        need_e, need_c, need_bias = ctx.needs_input_grad[:3]
        if grad_loss is None and grad_lse is None:
            return None, None, None, None, None
        # per-token weights of the loss and of the LSE output
        fvalid = valid.to(lse.dtype)
        if grad_loss is None:
            g_nll = torch.zeros_like(fvalid)
        elif cfg.reduction == "mean":
            g_nll = fvalid * (grad_loss.to(lse.dtype) / count.clamp(min=1))
        elif cfg.reduction == "sum":
            g_nll = fvalid * grad_loss.to(lse.dtype)
        else:
            g_nll = fvalid * grad_loss.reshape(-1).to(lse.dtype)
        g_lse = None if grad_lse is None else grad_lse.reshape(-1).to(lse.dtype)

        e_all = _hidden(e, cfg)
        reduce = _distributed(cfg) and cfg.vp.reduce_e_grad
        # A reduced gradient is accumulated directly in the reduction dtype, so an fp32 reduction
        # sums unrounded partials (and the implementation needs no 16-bit hi/lo residual).
        grad_dtype = cfg.vp.reduction_dtype(e.dtype) if reduce else e.dtype
        grad_e_all, grad_layout = gradient_layout(e_all, targets, cfg.shift, grad_dtype)
        # the hidden-gradient reduction starts as soon as dE is final, overlapping what remains
        # of the classifier gradient (the implementation says when: `grad_e_ready`)
        pending = []

        def grad_e_ready():
            pending.append(collectives.start_hidden_grad_reduction(grad_e_all, cfg.vp, e.dtype))

        grad_c, grad_bias = cfg.backend.backward(
            make_layout(e_all, targets, cfg.shift),
            grad_layout.e3,
            c,
            bias,
            lse=lse,
            z_target=z_target,
            g_nll=g_nll,
            g_lse=g_lse,
            vocab_start=cfg.vocab_start,
            target_weight=1.0 - cfg.label_smoothing,
            uniform_weight=cfg.label_smoothing / cfg.vocab_size,
            logit_scale=cfg.logit_scale,
            softcap=cfg.softcap,
            mode=cfg.mode,
            grad_e_ready=grad_e_ready if reduce else None,
            **cfg.extra(),
            **({} if bounds is None else {"tile_bounds": bounds}),
            **({} if tail[0] is None else {"tail": tuple(tail)}),
        )
        grad_e = pending[0].wait() if reduce else grad_e_all
        return (
            grad_e if need_e else None,
            grad_c if need_c else None,
            grad_bias if need_bias else None,
            None,
            None,
        )
