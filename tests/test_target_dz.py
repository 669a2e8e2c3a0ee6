"""`vpcce.kernels.target_dz`: the target column of ``dz`` from the forward's target logit, and
its 16-bit rounding residual in dE's accumulator (in the interpreter on CPU)."""

import pytest
import torch
from truth import rel_err, truth

import vpcce.kernels
from vpcce import linear_cross_entropy
from vpcce.kernels import grad_e, target_dz
from vpcce.kernels.common import interpreting
from vpcce.layout import make_layout
from vpcce.modes import BackwardMode

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize(
    "opts",
    [
        dict(smoothing=0.0, softcap=None, scale=1.0, z_loss=False),
        dict(smoothing=0.1, softcap=4.0, scale=0.5, z_loss=True),
    ],
    ids=["plain", "smoothing-softcap-scale-zloss"],
)
def test_target_dz_is_the_gradient_at_the_target(opts):
    """Against fp64 autograd of the materialized loss: dL/d(e . c[y]) per token."""
    g = torch.Generator().manual_seed(0)
    n, v = 9, 13
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    z = x * opts["scale"]
    if opts["softcap"] is not None:
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    lse = torch.logsumexp(z, dim=1)
    w_nll = torch.rand(n, generator=g, dtype=torch.float64)
    w_lse = torch.rand(n, generator=g, dtype=torch.float64) if opts["z_loss"] else None
    eps = opts["smoothing"]
    nll = lse - (1 - eps) * z[torch.arange(n), y] - eps * z.mean(dim=1)
    total = (w_nll * nll).sum() + (0 if w_lse is None else (w_lse * lse).sum())
    (grad,) = torch.autograd.grad(total, x)
    got = target_dz.target_dz(
        z[torch.arange(n), y].detach().float(),
        lse.detach().float(),
        w_nll.float(),
        None if w_lse is None else w_lse.float(),
        target_weight=1 - eps,
        uniform_weight=eps / v,
        logit_scale=opts["scale"],
        softcap=opts["softcap"],
    )
    assert rel_err(got, grad[torch.arange(n), y]) <= 1e-6


def test_split_rounds_to_nearest_and_keeps_the_rest():
    dz = torch.tensor([-0.0703125 - 3e-5, 1e-4 / 3, -1.0 + 1e-6, 0.25], dtype=torch.float32)
    owned = torch.tensor([True, True, True, False])
    hi, residual = target_dz.split(dz, torch.bfloat16, owned)
    assert torch.equal(hi, dz.to(torch.bfloat16))
    assert torch.equal(residual[:3], dz[:3] - hi[:3].float()) and residual[3] == 0
    assert (residual[:3].abs() <= hi[:3].float().abs() * 2**-8).all()


@pytest.mark.parametrize("hi_lo", [False, True], ids=["fp32", "hi-lo"])
def test_add_rows(hi_lo):
    """``out[m] += w[m] c[rows[m]]`` on a strided token view; tokens of weight 0 untouched (NaN
    stays NaN); a hi/lo pair takes the sum at fp32-like precision."""
    g = torch.Generator().manual_seed(1)
    b, t, d, v = 2, 37, 300, 50
    c = torch.randn(v, d, generator=g).to(torch.bfloat16)
    w = torch.randn(b * t, generator=g)
    w[::5] = 0
    rows = torch.randint(0, v, (b * t,), generator=g)
    want = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    add = w.double()[:, None] * c.double()[rows]
    if hi_lo:
        hi = want.to(torch.bfloat16)
        lo = (want - hi.double()).to(torch.bfloat16).view(b * t, d)
        base = torch.empty(b, t, d, dtype=torch.bfloat16)  # hi/lo residuals are dense matrices
        base.copy_(hi)
        target_dz.add_rows(base, w, rows, c, lo)
        got = base.double() + lo.view(b, t, d).double()
        expect = want + add.view(b, t, d)
        assert rel_err(got, expect) <= 2**-14
        assert torch.equal(base.view(b * t, d)[::5], hi.view(b * t, d)[::5])
    else:
        wide = torch.full((b, t + 3, d + 8), float("nan"))  # a strided [B, T', D] view
        out = wide[:, 1 : t + 1, :d]
        out.copy_(want)
        nan_rows = (w == 0).view(b, t)
        out[nan_rows] = float("nan")
        target_dz.add_rows(out, w, rows, c)
        expect = (want + add.view(b, t, d))[~nan_rows]
        assert rel_err(out[~nan_rows], expect) <= 1e-6
        assert out[nan_rows].isnan().all()
        assert wide[:, 0].isnan().all() and wide[:, :, d:].isnan().all()  # outside the view


def _captured_chunks(monkeypatch):
    """Spy on the backward: each dE product's ``(dz, first classifier row)`` and the target
    columns' 16-bit values (`target_dz.split`'s ``hi``)."""
    got = {"chunks": [], "hi": []}
    add, split = grad_e.EGradAccumulator.add, target_dz.split

    def spy_add(self, dz_chunk, c_chunk, **kw):
        row = c_chunk.storage_offset() // c_chunk.stride(0)  # in the full classifier
        got["chunks"].append((dz_chunk.clone(), row))
        return add(self, dz_chunk, c_chunk, **kw)

    def spy_split(dz, dtype, owned):
        hi, residual = split(dz, dtype, owned)
        got["hi"].append((hi, owned))
        return hi, residual

    monkeypatch.setattr(grad_e.EGradAccumulator, "add", spy_add)
    monkeypatch.setattr(target_dz, "split", spy_split)
    return got


def _inputs(dtype, seed=3, n=40, d=72, v=200):
    """Confident tokens (p_y ~ 0.9): the target entry dominates each token's gradient."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    y = torch.randint(0, v, (1, n), generator=g)
    e = (4.0 * c.float()[y[0]] + 0.3 * torch.randn(n, d, generator=g)).to(dtype)
    return e.view(1, n, d), c, y


def test_kernels_write_the_target_columns_16_bit_value(monkeypatch):
    """In every chunk's dz, each target's column holds ``hi`` bit for bit: several chunks, a
    vocabulary shard (targets on both sides of both edges), softcap and smoothing, a shift."""
    e, c, y = _inputs(torch.bfloat16)
    y[0, 1:7] = torch.tensor([0, 59, 60, 189, 190, 199])
    start, stop, softcap, eps = 60, 190, 8.0, 0.1
    layout = make_layout(e, y, 1)
    n, v = layout.num_tokens, c.shape[0]
    z = softcap * torch.tanh(layout.e3.reshape(n, -1).float() @ c.float().T / softcap)
    y_all = layout.flat_targets()
    got = _captured_chunks(monkeypatch)
    grad_e3 = torch.empty_like(layout.e3)
    vpcce.kernels.backward(
        layout, grad_e3, c[start:stop], None, lse=torch.logsumexp(z, dim=1),
        z_target=z.gather(1, y_all[:, None])[:, 0], g_nll=torch.full((n,), 1.0 / n), g_lse=None,
        vocab_start=start, target_weight=1 - eps, uniform_weight=eps / v, logit_scale=1.0,
        softcap=softcap, mode=BackwardMode(), chunk_bytes=n * 64 * 2,
    )  # fmt: skip
    ((hi, owned),) = got["hi"]
    y_local = y_all - start
    assert owned.any() and not owned.all()
    assert len(got["chunks"]) > 1
    seen = torch.zeros_like(owned)
    for dz, row in got["chunks"]:
        v0 = row - start
        here = owned & (y_local >= v0) & (y_local < v0 + dz.shape[1])
        tokens = here.nonzero()[:, 0]
        assert torch.equal(dz[tokens, y_local[tokens] - v0], hi[tokens])
        seen |= here
    assert torch.equal(seen, owned)


def _backward_fp32_grad(e, c, y):
    """The kernels' dE of the mean loss into an fp32 gradient (accumulated in place, as for a
    vocab-parallel fp32 reduction buffer): no final rounding hides dz's errors."""
    layout = make_layout(e, y, 0)
    n = layout.num_tokens
    z = layout.e3.reshape(n, -1).float() @ c.float().T
    grad = torch.empty(layout.e3.shape, dtype=torch.float32, device=e.device)
    vpcce.kernels.backward(
        layout, grad, c, None, lse=torch.logsumexp(z, dim=1),
        z_target=z.gather(1, layout.flat_targets()[:, None])[:, 0],
        g_nll=torch.full((n,), 1 / n, device=e.device),
        g_lse=None, vocab_start=0, target_weight=1.0, uniform_weight=0.0, logit_scale=1.0,
        softcap=None, mode=BackwardMode(), chunk_bytes=n * 64 * 2,
    )  # fmt: skip
    return grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_residual_brings_de_to_the_truth(dtype, monkeypatch):
    """Confident tokens, dE against the fp64 truth with the targets' residuals and without
    (`EGradAccumulator.add_rows` a no-op). Measured: bf16 3.5e-4 against 1.8e-3 (the rest is the
    interpreter's truncating casts of the other entries), fp16 1.9e-5 against 2.1e-4."""
    e, c, y = _inputs(dtype)
    tru = truth(e, c, y)
    with_residual = rel_err(_backward_fp32_grad(e, c, y), tru.de)
    monkeypatch.setattr(grad_e.EGradAccumulator, "add_rows", lambda *a, **k: None)
    without = rel_err(_backward_fp32_grad(e, c, y), tru.de)
    assert with_residual < 0.3 * without, (with_residual, without)


@pytest.mark.parametrize("kind", [grad_e.SCRATCH, grad_e.FP32, grad_e.HI_LO_PAIR])
def test_every_accumulator_takes_the_residual(kind, monkeypatch):
    """bf16 dE through each 16-bit gradient's accumulator: the residual changes the result and
    brings it closer to the fp64 truth (the hi/lo pair's casts truncate in the interpreter, so
    its error is the largest of the three here)."""
    e, c, y = _inputs(torch.bfloat16, v=500)  # the scratch's recompute stays under its bar
    tru = truth(e, c, y)
    kinds = []
    accumulate = grad_e.accumulator

    def spy(*a, **k):
        acc = accumulate(*a, **k)
        kinds.append(acc.kind)
        return acc

    def de():
        leaves = [x.detach().requires_grad_() for x in (e, c)]
        loss = linear_cross_entropy(
            *leaves, y, impl="triton", chunk_bytes=40 * 64 * 2, accum_e_fp32=kind == grad_e.FP32
        )
        return torch.autograd.grad(loss, leaves)[0]

    monkeypatch.setattr(grad_e, "accumulator", spy)
    if kind != grad_e.SCRATCH:  # no dE scratch in dC's rows
        monkeypatch.setattr(grad_e, "MAX_RECOMPUTE", 0.0)
    with_residual = de()
    monkeypatch.setattr(grad_e.EGradAccumulator, "add_rows", lambda *a, **k: None)
    without = de()
    assert kinds == [kind, kind]
    assert not torch.equal(with_residual, without)
    assert rel_err(with_residual, tru.de) < rel_err(without, tru.de)


def test_bias_gradient_sums_the_unrounded_target_entry():
    """The bias gradient sums dz in fp32, the target's entry unrounded (its residual goes to dE
    only): at the bf16 rounding of the truth on confident tokens (measured equal to it; with the
    rounded entry, 1.1-1.6x it)."""
    g = torch.Generator().manual_seed(1)
    n, d, v = 256, 64, 96
    c = (torch.randn(v, d, generator=g) / d**0.5).to(torch.bfloat16)
    y = torch.randint(0, v, (1, n), generator=g)
    e = (4.0 * c.float()[y[0]] + 0.3 * torch.randn(n, d, generator=g)).bfloat16().view(1, n, d)
    b = (0.1 * torch.randn(v, generator=g)).bfloat16()
    tru = truth(e, c, y, b)
    leaves = [x.detach().requires_grad_() for x in (e, c, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], y, leaves[2], impl="triton")
    grad_b = torch.autograd.grad(loss, leaves)[2]
    floor = rel_err(tru.dbias.to(torch.bfloat16), tru.dbias)
    assert rel_err(grad_b, tru.dbias) <= 1.05 * floor
