"""Implementation names, apple cut_cross_entropy aliases, and the backward mode they resolve to.

Our implementations:

- ``"torch"``: the exact pure-PyTorch reference (any device; chunked, never ``N x V``).
- ``"triton"``: the fused Triton kernels (CUDA, or the Triton interpreter on CPU).
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton is importable, else ``"torch"``.

apple/ml-cross-entropy names are accepted so callers switch by changing the import:

=====================  ==========================================================================
apple ``impl``         vpcce meaning
=====================  ==========================================================================
``"cce"``              ``"triton"`` with the caller's ``filter_eps`` (``"auto"``: our accuracy bar)
``"cce_exact"``        ``"triton"``, no gradient filtering (``filter_eps=None``)
``"cce_kahan_full_c"`` ``"triton"``, no filtering, fp32 accumulation of both gradients
``"cce_kahan_full_e"`` same as ``"cce_kahan_full_c"`` (our accumulation is already compensated)
``"torch_compile"``    ``"torch"``: the exact chunked reference, not a compiled materializing one
=====================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

OUR_IMPLS = ("auto", "torch", "triton")
APPLE_ALIASES = ("cce", "cce_exact", "cce_kahan_full_c", "cce_kahan_full_e", "torch_compile")


@dataclass(frozen=True)
class BackwardMode:
    """How the backward pass trades work for accuracy.

    ``filter_eps=None`` is exact. A float skips gradient tiles where every
    ``|softmax - smoothed one-hot|`` is below it (``filter_e_grad`` / ``filter_c_grad`` choose which
    gradient GEMMs may skip). ``accum_*_fp32`` accumulate that gradient in an fp32 buffer.

    ``tail_share`` (``filter_eps="auto"`` and ``"tail"``; exclusive with a float
    ``filter_eps``): the backward skips the ``[BLOCK_N, BLOCK_V]`` tiles that hold less than
    ``tail_share`` times their uniform share (``BLOCK_V / vocab``) of every one of their tokens'
    softmax mass, and adds what they would have given the gradients to first order: each token's
    skipped mass (from the forward's per-tile log-sum-exp) times the mean classifier row
    (`vpcce.kernels.tail`). ``tail_checked`` (``"auto"``): only where a sample of tokens shows
    the correction's errors well below the materialized baseline's (`tail.beats_baseline`).
    """

    filter_eps: float | None = None
    filter_e_grad: bool = True
    filter_c_grad: bool = True
    accum_e_fp32: bool = False
    accum_c_fp32: bool = False
    tail_share: float | None = None
    tail_checked: bool = True


# `BackwardMode.tail_share` of ``filter_eps="auto"`` and ``"tail"``. fp64 study (docs/perf.md,
# round 20): on LM-like data at 5 and 12 nats no tile is below half its share (exact there), at
# 1 nat 87% of the Gemma 2 head's tiles are.
DEFAULT_TAIL_SHARE = 0.5


def tail_options(filter_eps) -> dict:
    """`BackwardMode`'s ``tail_share`` and ``tail_checked`` for a `linear_cross_entropy`
    ``filter_eps``: the default share, checked for ``"auto"``, unchecked for ``"tail"``."""
    share = DEFAULT_TAIL_SHARE if filter_eps in ("auto", "tail") else None
    return {"tail_share": share, "tail_checked": filter_eps != "tail"}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_filter_eps(filter_eps) -> float | None:
    """``"auto"`` and ``"tail"`` -> no per-entry filter (None); None/float pass through.

    Measured (docs/perf.md, round 10): on LM-like data no sizeable set of tiles is negligible at
    the baseline's accuracy (the long tail adds up coherently: dropping tiles whose entries are all
    below 1e-5 costs 40-50% hidden-gradient error at 1 nat), so "auto" drops no tile outright: it
    skips the tail with a first-order correction instead (`tail_share`), where a sample shows it
    beating the baseline; ``"tail"`` skips it unchecked (round 20).
    """
    if filter_eps in ("auto", "tail") or filter_eps is None:
        return None
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise TypeError(
            f"filter_eps must be 'auto', 'tail', None or a float >= 0, got {filter_eps!r}"
        )
    if not filter_eps >= 0:
        raise ValueError(f"filter_eps must be >= 0, got {filter_eps!r}")
    return float(filter_eps)


def resolve_impl(
    impl: str, device: torch.device, mode: BackwardMode, dtype: torch.dtype = torch.float32
) -> tuple[str, BackwardMode]:
    """Map an ``impl`` name (ours or apple's) to ``("torch" | "triton", BackwardMode)``.

    fp64 inputs (e.g. gradcheck) always take the reference: the kernels have no fp64 dot.
    """
    if not isinstance(impl, str) or impl not in OUR_IMPLS + APPLE_ALIASES:
        raise ValueError(f"impl must be one of {OUR_IMPLS + APPLE_ALIASES}, got {impl!r}")
    if dtype == torch.float64 and impl != "torch":
        if impl != "auto":
            raise ValueError(
                f"impl={impl!r} runs the Triton kernels, which take fp32/bf16/fp16, "
                "got float64; use impl='torch'"
            )
        return "torch", mode
    if impl == "torch_compile":
        return "torch", mode
    if impl == "cce_exact":
        return "triton", replace(mode, filter_eps=None, tail_share=None)
    if impl in ("cce_kahan_full_c", "cce_kahan_full_e"):
        exact = replace(mode, filter_eps=None, tail_share=None)
        return "triton", replace(exact, accum_e_fp32=True, accum_c_fp32=True)
    if impl == "cce":
        return "triton", mode
    if impl == "auto":
        return ("triton" if device.type == "cuda" and triton_available() else "torch"), mode
    return impl, mode
