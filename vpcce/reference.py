"""Exact pure-PyTorch implementation (``impl="torch"``): the contract the Triton kernels meet.

It walks ``[token chunk x vocab chunk]`` tiles of the logits in fp32, so its peak extra memory is
bounded by ``chunk_bytes`` (default `DEFAULT_CHUNK_BYTES`) and never grows as ``N x V``:

- forward keeps only the per-token partials of `vpcce.partials` (six fp32 numbers per token);
- backward recomputes each tile's logits, forms ``dz = dL/dz`` and accumulates
  ``dE = dz @ C`` and ``dC = dz^T @ E`` in fp32.

Beyond the chunk budget, backward holds fp32 gradient accumulators: ``[N, D]`` for the hidden
states and ``[vocab chunk, D]`` for the classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vpcce.layout import TokenLayout
from vpcce.modes import BackwardMode
from vpcce.partials import (
    MAX,
    NUM_STATS,
    SUMEXP,
    SUMZ,
    XLOGX,
    ZTARGET,
    argmax_column,
    empty_partials,
    merge_partials,
    stats_dtype,
)

DEFAULT_CHUNK_BYTES = 256 * 2**20
# fp32 [tokens x vocab] temporaries alive at once in a tile step (logits, exp, product, dz, mask).
_BYTES_PER_TILE_ELEMENT = 5 * 4


def chunk_sizes(num_tokens: int, vocab: int, dim: int, chunk_bytes: int) -> tuple[int, int]:
    """(tokens, vocab) per tile so tile temporaries plus fp32 operand copies fit ``chunk_bytes``."""
    n = max(num_tokens, 1)
    v = max(min(vocab, 8192), 1)
    while True:
        # tiles: BYTES * Nc * Vc; operand chunks in fp32: 4 * D * (Nc + Vc); dC chunk accumulator.
        fixed = 4 * dim * v * 2
        nc = (chunk_bytes - fixed) // (_BYTES_PER_TILE_ELEMENT * v + 4 * dim)
        if nc >= min(n, 16) or v == 1:
            return int(max(1, min(n, nc))), v
        v = max(1, v // 2)


def _rows(layout: TokenLayout, start: int, stop: int) -> torch.Tensor:
    """fp32 (fp64) copy of flat tokens ``[start, stop)`` of ``e3`` (index arithmetic on views)."""
    idx = torch.arange(start, stop, device=layout.e3.device)
    t = layout.seq_len
    return layout.e3[idx // t, idx % t].to(stats_dtype(layout.e3.dtype))


def _logits(e_rows, c_rows, bias_rows, logit_scale: float, softcap: float | None):
    """fp32 ``softcap(logit_scale * (e @ c.T + bias))`` for one tile."""
    z = e_rows @ c_rows.T
    if bias_rows is not None:
        z = z + bias_rows
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _tile_partials(z: torch.Tensor, y_local: torch.Tensor, v0: int, id_offset: int) -> torch.Tensor:
    """[Nc, 6] partials of one ``[Nc, Vc]`` logits tile covering local vocab ``[v0, v0 + Vc)``."""
    parts = torch.empty(z.shape[0], NUM_STATS, dtype=z.dtype, device=z.device)
    m, idx = z.max(dim=1)
    # -inf logits (a vocabulary masked by a -inf bias) weigh 0, as in F.cross_entropy. A row that is
    # all -inf is an empty slice: shift it by 0, not -inf, so no (-inf) - (-inf) = NaN appears.
    shifted = z - torch.where(torch.isneginf(m), torch.zeros_like(m), m)[:, None]
    p = torch.exp(shifted)
    shifted.clamp_(min=torch.finfo(z.dtype).min)  # p = 0 there: 0 * -inf would make XLOGX NaN
    parts[:, MAX] = m
    parts[:, SUMEXP] = p.sum(dim=1)
    parts[:, XLOGX] = (p * shifted).sum(dim=1)
    parts[:, SUMZ] = z.sum(dim=1)
    col = y_local - v0
    owned = (col >= 0) & (col < z.shape[1])
    zt = z.gather(1, col.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    parts[:, ZTARGET] = torch.where(owned, zt, torch.zeros_like(zt))
    argmax_column(parts).copy_(idx + (v0 + id_offset))
    return parts


def forward_partials(
    layout: TokenLayout,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    vocab_start: int,
    logit_scale: float,
    softcap: float | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    stats: bool = True,
    sum_z: bool = True,
) -> torch.Tensor:
    """[N, 6] fp32 partials of this vocabulary shard (``c`` holds ids ``vocab_start + i``).

    Every column is computed: ``stats`` and ``sum_z`` (which columns the caller reads, see
    `vpcce.kernels.forward_partials`) are accepted and ignored.
    """
    del stats, sum_z
    n, (v, d) = layout.num_tokens, c.shape
    y_local = layout.flat_targets() - vocab_start
    acc = stats_dtype(c.dtype)
    out = empty_partials(n, c.device, acc)
    nc, vc = chunk_sizes(n, v, d, chunk_bytes)
    for v0 in range(0, v, vc):
        c_rows = c[v0 : v0 + vc].to(acc)
        b_rows = None if bias is None else bias[v0 : v0 + vc].to(acc)
        for n0 in range(0, n, nc):
            n1 = min(n, n0 + nc)
            z = _logits(_rows(layout, n0, n1), c_rows, b_rows, logit_scale, softcap)
            tile = _tile_partials(z, y_local[n0:n1], v0, vocab_start)
            out[n0:n1] = merge_partials(torch.stack((out[n0:n1], tile)))
    return out


def backward(
    layout: TokenLayout,
    grad_e3: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    lse: torch.Tensor,
    g_nll: torch.Tensor,
    g_lse: torch.Tensor | None,
    vocab_start: int,
    target_weight: float,
    uniform_weight: float,
    logit_scale: float,
    softcap: float | None,
    mode: BackwardMode,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    grad_e_ready: Callable[[], None] | None = None,
    z_target: torch.Tensor | None = None,
):
    """Write this shard's ``dL/de`` into ``grad_e3`` ``[B, T', D]``; return ``(grad_c, grad_bias)``.

    Per token ``n`` with upstream weights ``g_nll[n]`` (loss) and ``g_lse[n]`` (LSE output):
    ``dz[n, v] = (g_nll + g_lse) p[n, v] - g_nll (target_weight [v = y_n] + uniform_weight)``,
    then the softcap and logit_scale chain rule. The reference is always exact: ``mode`` is
    accepted for interface parity and its filter is not applied; so is ``z_target`` (the
    kernels' target column comes from it, here every logit is computed in ``stats_dtype``).
    ``grad_e_ready`` is called once ``grad_e3`` is final, which here is at the end (dE and dC
    come from the same loop).
    """
    del mode, z_target
    n, (v, d) = layout.num_tokens, c.shape
    y_local = layout.flat_targets() - vocab_start
    g_total = g_nll if g_lse is None else g_nll + g_lse
    acc = stats_dtype(c.dtype)
    grad_e = torch.zeros(n, d, dtype=acc, device=c.device)
    grad_c = torch.empty(v, d, dtype=c.dtype, device=c.device)
    grad_bias = None if bias is None else torch.empty(v, dtype=bias.dtype, device=c.device)
    nc, vc = chunk_sizes(n, v, d, chunk_bytes)
    for v0 in range(0, v, vc):
        v1 = min(v, v0 + vc)
        c_rows = c[v0:v1].to(acc)
        b_rows = None if bias is None else bias[v0:v1].to(acc)
        acc_c = torch.zeros(v1 - v0, d, dtype=acc, device=c.device)
        acc_b = torch.zeros(v1 - v0, dtype=acc, device=c.device)
        for n0 in range(0, n, nc):
            n1 = min(n, n0 + nc)
            e_rows = _rows(layout, n0, n1)
            z = _logits(e_rows, c_rows, b_rows, logit_scale, softcap)
            dz = torch.exp(z - lse[n0:n1, None]) * g_total[n0:n1, None]
            if uniform_weight:
                dz -= (uniform_weight * g_nll[n0:n1])[:, None]
            col = y_local[n0:n1] - v0
            owned = (col >= 0) & (col < v1 - v0)
            hit = torch.where(owned, target_weight * g_nll[n0:n1], torch.zeros_like(lse[n0:n1]))
            dz.scatter_add_(1, col.clamp(0, v1 - v0 - 1)[:, None], -hit[:, None])
            if softcap is not None:
                dz *= 1.0 - (z / softcap) ** 2
            if logit_scale != 1.0:
                dz *= logit_scale
            grad_e[n0:n1] += dz @ c_rows
            acc_c += dz.T @ e_rows
            acc_b += dz.sum(dim=0)
        grad_c[v0:v1] = acc_c
        if grad_bias is not None:
            grad_bias[v0:v1] = acc_b
    grad_e3.copy_(grad_e.view(grad_e3.shape))
    if grad_e_ready is not None:
        grad_e_ready()
    return grad_c, grad_bias
