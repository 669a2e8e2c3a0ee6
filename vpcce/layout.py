"""Token layout: ``(..., T, D)`` hidden states and ``(..., T)`` targets as ``[B, T', D]`` views.

``shift=k`` pairs ``e[..., :-k, :]`` with ``targets[..., k:]``; both are views, so no hidden
state is copied. Implementations address token ``n`` of the flattened ``N = B * T'`` tokens as
``(n // T', n % T')`` through the views' strides (index arithmetic, not a gather).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    e3: torch.Tensor  # [B, T', D] view of the hidden states paired with a target
    y2: torch.Tensor  # [B, T'] int view of the targets (already shifted)
    out_shape: tuple[int, ...]  # shape of a per-token output, e.g. reduction="none": (..., T')

    @property
    def num_tokens(self) -> int:
        return self.y2.numel()

    @property
    def seq_len(self) -> int:
        return self.y2.shape[1]

    def flat_targets(self) -> torch.Tensor:
        """[N] int64 targets (a copy of N integers, never of hidden states)."""
        return self.y2.reshape(-1).long()


def make_layout(e: torch.Tensor, targets: torch.Tensor, shift: int) -> TokenLayout:
    """Views for ``e (..., T, D)`` and ``targets (..., T)`` after dropping ``shift`` positions."""
    d = e.shape[-1]
    if e.dim() == 1:
        return TokenLayout(e.view(1, 1, d), targets.reshape(1, 1), ())
    t = e.shape[-2]
    b = math.prod(e.shape[:-2])
    e3 = e.reshape(b, t, d)  # a view whenever the leading dims can merge (the usual case)
    y2 = targets.reshape(b, t)
    if shift:  # (each view costs host time before the forward's launch)
        e3, y2 = e3[:, : t - shift], y2[:, shift:]
    return TokenLayout(e3, y2, (*e.shape[:-2], t - shift))


def gradient_layout(
    e: torch.Tensor, targets: torch.Tensor, shift: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, TokenLayout]:
    """A fresh contiguous gradient for ``e`` (in ``dtype``, default e's) and its token views.

    Positions that ``shift`` leaves unpaired stay zero.
    """
    dtype = dtype or e.dtype
    if shift:
        grad_e = torch.zeros(e.shape, dtype=dtype, device=e.device)
    else:
        grad_e = torch.empty(e.shape, dtype=dtype, device=e.device)
    return grad_e, make_layout(grad_e, targets, shift)
