"""Mergeable per-token partials of a softmax over a slice of the vocabulary.

Every implementation (the PyTorch reference, the Triton kernels, each rank of a vocab-parallel
group) reduces its slice of the logits ``z[n, v]`` to six fp32 numbers per token (fp64 for fp64
inputs), packed as ``[..., 6]``:

=========  ==================================================================================
column     meaning over the slice
=========  ==================================================================================
MAX        ``m = max_v z``  (``-inf`` for an empty slice)
SUMEXP     ``s = sum_v exp(z - m)``
XLOGX      ``x = sum_v exp(z - m) * (z - m)``  (<= 0; gives the entropy without a second pass)
SUMZ       ``sum_v z``  (label smoothing needs the mean logit over the *global* vocabulary)
ZTARGET    ``z[n, y_n]`` if the slice owns the target, else 0
ARGMAX     the global vocabulary id of ``m`` (integer bits stored in the float column)
=========  ==================================================================================

Slices merge associatively (`merge_partials`), in a fixed order so every rank gets bitwise the same
result, and a merged partial is turned into loss / LSE / entropy / argmax by `finalize`.
"""

from __future__ import annotations

import torch

MAX, SUMEXP, XLOGX, SUMZ, ZTARGET, ARGMAX = range(6)
NUM_STATS = 6


def stats_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Partials, LSE and loss are fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def empty_partials(num_tokens: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """[N, 6]: the identity of `merge_partials` (an empty vocabulary slice)."""
    parts = torch.zeros(num_tokens, NUM_STATS, dtype=dtype, device=device)
    parts[:, MAX] = float("-inf")
    return parts


def argmax_column(parts: torch.Tensor) -> torch.Tensor:
    """[...] integer view of the ARGMAX column (its bits are an integer vocabulary id)."""
    return parts[..., ARGMAX].view(torch.int64 if parts.dtype == torch.float64 else torch.int32)


def merge_partials(
    stacked: torch.Tensor, *, stats: bool = True, sum_z: bool = True
) -> torch.Tensor:
    """Merge ``[S, N, 6]`` partials over S disjoint vocab slices into ``[N, 6]``, in slice order.

    Ties in the maximum keep the first slice's argmax (slices are in vocabulary order, so this is
    the lowest id, as ``torch.argmax`` would give). ``stats=False`` leaves the XLOGX and ARGMAX
    columns unmerged, ``sum_z=False`` the SUMZ column (their values then mean nothing: the forward
    did not compute them, `vpcce.kernels.forward.forward_partials`): each column is a few small
    ops, host time of every forward.
    """
    m = stacked[..., MAX]
    m_all = m.max(dim=0).values
    # An all-empty token keeps m = -inf; shift by 0 instead so no (-inf) - (-inf) = NaN appears.
    m_ref = torch.where(torch.isneginf(m_all), torch.zeros_like(m_all), m_all)
    delta = m - m_ref  # [S, N], <= 0 (or -inf for empty slices)
    scale = torch.exp(delta)
    s = stacked[..., SUMEXP]
    merged = torch.empty_like(stacked[0])
    merged[:, MAX] = m_all
    merged[:, SUMEXP] = (scale * s).sum(dim=0)
    merged[:, ZTARGET] = stacked[..., ZTARGET].sum(dim=0)
    if sum_z:
        merged[:, SUMZ] = stacked[..., SUMZ].sum(dim=0)
    if stats:
        # x' = e^{m_i - M} (x_i + (m_i - M) s_i); guarded where a slice is empty (delta = -inf,
        # s = 0)
        x = torch.where(s > 0, scale * (stacked[..., XLOGX] + delta * s), torch.zeros_like(s))
        merged[:, XLOGX] = x.sum(dim=0)
        winner = m.argmax(dim=0, keepdim=True)  # first slice holding the max
        ids = argmax_column(stacked).gather(0, winner).squeeze(0)
        argmax_column(merged).copy_(ids)
    return merged


def finalize(parts: torch.Tensor, vocab_size: int, label_smoothing: float, stats: bool = True):
    """Turn merged ``[N, 6]`` partials over the whole vocabulary into per-token statistics.

    Returns ``(lse, nll, entropy, argmax)``: ``lse``, ``nll`` and ``entropy`` are [N] fp32 and
    ``argmax`` is [N] int64. ``nll`` is PyTorch's label-smoothed cross-entropy
    ``lse - (1 - a) * z_y - a / V * sum_v z_v``; it is not yet masked for ignored tokens.
    ``stats=False`` (XLOGX and ARGMAX not computed): entropy 0 and argmax -1.
    """
    s = parts[:, SUMEXP]
    log_s = torch.log(s)
    lse = parts[:, MAX] + log_s
    nll = lse - (1.0 - label_smoothing) * parts[:, ZTARGET]
    if label_smoothing:
        nll = nll - (label_smoothing / vocab_size) * parts[:, SUMZ]
    if not stats:
        return lse, nll, torch.zeros_like(lse), torch.full(lse.shape, -1, device=lse.device)
    # H = lse - E_p[z] = log s - x / s  (x is taken relative to the max, see the module docstring)
    entropy = log_s - parts[:, XLOGX] / s
    argmax = argmax_column(parts).long()
    return lse, nll, entropy, argmax
