"""The loss implementations the benchmark compares: functions ``(e, c, targets) -> mean loss``.

``e``: ``[N, D]`` hidden states, ``c``: ``[V_local, D]`` this rank's classifier rows
``[start, stop)`` (all of them in a single process), ``targets``: ``[N]`` global ids. A method's
builder returns the loss function or raises `Unavailable` with the reason (package not installed,
needs CUDA, not vocab-parallel); `bench` reports that reason instead of a number.

Under torchrun (world size > 1) only vocab-parallel methods run: vpcce through its own
`VocabParallelOptions`; Megatron's ``vocab_parallel_cross_entropy`` and apple's vocab-parallel
options on the logits of the local shard, with the hidden-state gradient summed over the group in
backward as Megatron's ``ColumnParallelLinear`` does (`_sum_grad_over_group`). The others need the
whole vocabulary on one rank and are skipped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vpcce import VocabParallelOptions, linear_cross_entropy

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Unavailable(Exception):
    """This method cannot run here; the message says why."""


@dataclass(frozen=True)
class Setting:
    """Where the methods run: device, vocabulary layout and process group."""

    device: torch.device
    vocab_size: int  # global V
    start: int  # this rank's vocabulary rows [start, stop)
    stop: int
    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None  # None: the default group (when one is initialized)
    vpcce_impl: str = "torch"  # "triton" | "torch": what the vpcce methods run


@dataclass(frozen=True)
class Method:
    name: str
    about: str  # one line for the report
    build: Callable[[Setting], LossFn]


METHODS: dict[str, Method] = {}


def _register(name: str, about: str):
    def add(build):
        METHODS[name] = Method(name, about, build)
        return build

    return add


def materialized(e: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What callers write without a fused loss: logits in the input dtype, fp32 cross-entropy."""
    return F.cross_entropy((e @ c.T).float(), y)


def gemm(e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The floor: the logits GEMM of the same shape (cuBLAS on CUDA)."""
    return e @ c.T


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient (Megatron's copy-to-TP-region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _sum_grad_over_group(e: torch.Tensor, s: Setting) -> torch.Tensor:
    return e if s.world == 1 else _SumGradOverGroup.apply(e, s.group)


def _not_vocab_parallel(s: Setting, name: str) -> None:
    if s.world > 1:
        raise Unavailable(f"{name} is not vocab-parallel (needs the whole vocabulary on one rank)")


def _needs_cuda(s: Setting, name: str) -> None:
    if s.device.type != "cuda":
        raise Unavailable(f"{name} needs CUDA")


def _vpcce_options(s: Setting) -> VocabParallelOptions | None:
    return None if s.world == 1 else VocabParallelOptions(s.start, s.stop, s.group)


@_register(
    "vpcce_exact", "vpcce, exact backward (filter_eps=None; impl cce_exact, or torch on CPU)"
)
def _vpcce_exact(s: Setting) -> LossFn:
    impl = "cce_exact" if s.vpcce_impl == "triton" else "torch"
    opts = _vpcce_options(s)

    def loss(e, c, y):
        return linear_cross_entropy(
            e, c, y, impl=impl, filter_eps=None, vocab_parallel_options=opts
        )

    return loss


@_register("vpcce", "vpcce with its default options (filter_eps='auto')")
def _vpcce_default(s: Setting) -> LossFn:
    impl, opts = s.vpcce_impl, _vpcce_options(s)

    def loss(e, c, y):
        return linear_cross_entropy(e, c, y, impl=impl, vocab_parallel_options=opts)

    return loss


def _vpcce_with(s: Setting, filter_eps) -> LossFn:
    impl, opts = s.vpcce_impl, _vpcce_options(s)

    def loss(e, c, y):
        return linear_cross_entropy(
            e, c, y, impl=impl, filter_eps=filter_eps, vocab_parallel_options=opts
        )

    return loss


@_register(
    "vpcce_filtered",
    "vpcce's opt-in fast mode: apple's tile filter filter_eps=2**-12, tiles dropped unseen",
)
def _vpcce_filtered(s: Setting) -> LossFn:
    return _vpcce_with(s, 2.0**-12)


@_register(
    "vpcce_tail",
    "vpcce's opt-in tail mode: filter_eps='tail', the softmax tail skipped, first-order corrected",
)
def _vpcce_tail(s: Setting) -> LossFn:
    return _vpcce_with(s, "tail")


@_register("eager", "eager baseline F.cross_entropy((e @ c.T).float(), y)")
def _eager(s: Setting) -> LossFn:
    _not_vocab_parallel(s, "the eager baseline")
    return materialized


@_register("compile", "torch.compile of the eager baseline (dynamic=False)")
def _compiled(s: Setting) -> LossFn:
    _not_vocab_parallel(s, "the compiled baseline")

    def compiled_baseline(e, c, y):  # its own code object: its own compile cache
        return F.cross_entropy((e @ c.T).float(), y)

    return torch.compile(compiled_baseline, dynamic=False)


@_register(
    "megatron", "Megatron-Core vocab_parallel_cross_entropy on e @ c.T ([s, b, V/tp] logits)"
)
def _megatron(s: Setting) -> LossFn:
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    except ImportError as err:
        raise Unavailable(f"megatron-core is not importable ({err})") from None
    if s.vocab_size % s.world:
        raise Unavailable(f"Megatron needs equal shards: V {s.vocab_size} % world {s.world} != 0")
    if not dist.is_initialized():
        raise Unavailable("Megatron needs torch.distributed initialized (bench does it)")
    kwargs = {}
    if "tp_group" in inspect.signature(vocab_parallel_cross_entropy).parameters:
        kwargs["tp_group"] = s.group if s.group is not None else dist.group.WORLD
    elif not parallel_state.model_parallel_is_initialized():  # megatron-core < 0.17: global state
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=s.world)

    def loss(e, c, y):
        logits = (_sum_grad_over_group(e, s) @ c.T).view(e.shape[0], 1, c.shape[0])
        return vocab_parallel_cross_entropy(logits, y.view(-1, 1), **kwargs).mean()

    return loss


def _apple(s: Setting, impl: str) -> LossFn:
    try:
        from cut_cross_entropy import linear_cross_entropy as apple_lce
    except ImportError as err:
        raise Unavailable(f"cut-cross-entropy is not importable ({err})") from None
    _needs_cuda(s, "apple cut-cross-entropy")
    opts = None
    if s.world > 1:
        try:
            from cut_cross_entropy.vocab_parallel import VocabParallelOptions as AppleOptions
        except ImportError:
            raise Unavailable("this cut-cross-entropy has no vocab parallelism") from None
        opts = AppleOptions(start=s.start, stop=s.stop, group=s.group)

    def loss(e, c, y):
        # apple's vocab-parallel backward leaves each rank's partial dE (like Megatron's CE)
        kw = {} if opts is None else {"vocab_parallel_options": opts}
        return apple_lce(_sum_grad_over_group(e, s), c, y, impl=impl, **kw)

    return loss


@_register("apple", "apple cut-cross-entropy, impl cce (its default gradient filter)")
def _apple_default(s: Setting) -> LossFn:
    return _apple(s, "cce")


@_register("apple_exact", "apple cut-cross-entropy, impl cce_exact")
def _apple_exact(s: Setting) -> LossFn:
    return _apple(s, "cce_exact")


@_register("liger", "Liger-Kernel LigerFusedLinearCrossEntropyLoss (fp32 accumulation if offered)")
def _liger(s: Setting) -> LossFn:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )
    except ImportError as err:
        raise Unavailable(f"liger-kernel is not importable ({err})") from None
    _needs_cuda(s, "Liger-Kernel")
    _not_vocab_parallel(s, "Liger-Kernel")
    params = inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters
    module = LigerFusedLinearCrossEntropyLoss(
        **({"accum_dtype": torch.float32} if "accum_dtype" in params else {})
    )

    def loss(e, c, y):
        return module(c, e, y)  # (lin_weight, _input, target)

    return loss


def build(name: str, s: Setting) -> LossFn:
    """The loss function of method ``name`` in setting ``s``; raises `Unavailable`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name].build(s)
