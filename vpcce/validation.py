"""Argument checks for `linear_cross_entropy`: one clear exception naming the argument."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def is_integer(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A Python or NumPy real number, not a bool (a flag passed by mistake)."""
    return isinstance(x, Real) and not isinstance(x, bool)


def _require_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_inputs(
    e,
    c,
    targets,
    bias,
    *,
    shift,
    ignore_index,
    reduction,
    label_smoothing,
    softcap,
    logit_scale,
    sequence_parallel_world=1,
):
    """Validate shapes, dtypes and devices.

    Under sequence parallelism ``e`` is this rank's ``[n, ..., D]`` slice and the targets have the
    shape of the gathered hidden states, ``[sequence_parallel_world * n, ...]``.
    """
    for name, x in (("e", e), ("c", c), ("targets", targets)):
        _require_tensor(name, x)
    if e.dim() < 1:
        raise ValueError("e must have shape (..., D), got a 0-d tensor")
    if c.dim() != 2:
        raise ValueError(f"c must have shape (V, D), got shape {tuple(c.shape)}")
    if c.shape[1] != e.shape[-1]:
        raise ValueError(
            f"c has D={c.shape[1]} but e has D={e.shape[-1]} "
            f"(shapes {tuple(c.shape)}, {tuple(e.shape)})"
        )
    if c.shape[0] < 1:
        raise ValueError("c must hold at least one vocabulary row")
    if e.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"e must be a floating-point tensor, got dtype {e.dtype}")
    if c.dtype != e.dtype:
        raise TypeError(f"c dtype {c.dtype} does not match e dtype {e.dtype}")
    if c.device != e.device:
        raise ValueError(f"c is on {c.device} but e is on {e.device}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if targets.device != e.device:
        raise ValueError(f"targets is on {targets.device} but e is on {e.device}")
    full_shape = tuple(e.shape)
    if sequence_parallel_world > 1:
        if e.dim() < 2:
            raise ValueError(
                f"sequence parallel e must have shape (n, ..., D), got {tuple(e.shape)}"
            )
        full_shape = (e.shape[0] * sequence_parallel_world, *e.shape[1:])
    if tuple(targets.shape) != full_shape[:-1]:
        raise ValueError(
            f"targets must have shape {full_shape[:-1]} (e.shape[:-1]), got {tuple(targets.shape)}"
        )
    if bias is not None:
        _require_tensor("bias", bias)
        if tuple(bias.shape) != (c.shape[0],):
            raise ValueError(f"bias must have shape ({c.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != e.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match e dtype {e.dtype}")
        if bias.device != e.device:
            raise ValueError(f"bias is on {bias.device} but e is on {e.device}")
    if not is_integer(shift):
        raise TypeError(f"shift must be an int, got {shift!r}")
    if not is_integer(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    max_shift = full_shape[-2] if len(full_shape) > 1 else 0
    if not 0 <= shift <= max_shift:
        raise ValueError(
            f"shift must be in [0, {max_shift}] for e of shape {tuple(e.shape)}, got {shift}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (is_number(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    # softcap s: s tanh(z / s) is 0 * inf at s = inf (no cap is softcap=None)
    if softcap is not None and not (is_number(softcap) and 0 < softcap < math.inf):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    if not is_number(logit_scale):
        raise TypeError(f"logit_scale must be a float, got {logit_scale!r}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale!r}")


def check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Targets must be in ``[0, vocab_size)`` or equal ``ignore_index``.

    On the CPU this is an eager check. On an accelerator it is a device-side assert
    (``torch._assert_async``): no host synchronization, and a bad target aborts the CUDA context
    with the message below at the next synchronization point.
    """
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    msg = f"targets must be in [0, {vocab_size}) or equal ignore_index={ignore_index}"
    if targets.device.type == "cpu":
        if bool(bad.any()):
            first = targets[bad].reshape(-1)[0].item()
            raise ValueError(f"{msg}; found {first}")
    else:
        torch._assert_async(~bad.any(), msg)
