"""The softmax tail of ``filter_eps="tail"`` (`vpcce.kernels.tail`): the forward's per-tile
log-sum-exp, the tiles the plan skips, and the backward's first-order correction, against fp64.

CPU through the Triton interpreter (small shapes, its 32 x 64 tiles); on a CUDA machine the same
tests run on the GPU (marked ``cuda``), where the forward is the Hopper kernel."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from truth import bf16_baseline, rel_err, truth

import vpcce.function as function_module
import vpcce.kernels
from vpcce import linear_cross_entropy
from vpcce.api import loss_config
from vpcce.kernels import tail, tile_summary
from vpcce.kernels.common import blocks
from vpcce.launch.data import lm_like
from vpcce.layout import make_layout
from vpcce.partials import finalize

backward_module = importlib.import_module("vpcce.kernels.backward")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# the interpreter's tiles are 32 x 64, the GPU's 128 x 256: a few token blocks and 20 tiles
N, V = (96, 1280) if DEVICE == "cpu" else (384, 5120)


def _peaked(dtype=torch.float32, n=N, d=80, v=V, seed=3):
    """Tokens near one of the first 64 classifier rows: every other tile holds little mass."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(v, d, generator=g) / d**0.5
    peak = torch.randint(0, 64, (n,), generator=g)
    y = peak.clone()
    y[1::16] = torch.randint(0, v, y[1::16].shape, generator=g)  # some targets in the tail
    scale = 10 if DEVICE == "cpu" else 14  # the GPU's tiles are 4x wider: a lighter tail
    e = scale * c[peak] + 0.3 * torch.randn(n, d, generator=g) / d**0.5
    return e.to(dtype).to(DEVICE), c.to(dtype).to(DEVICE), y.to(DEVICE)


def _grads(e, c, y, _z_loss=0.0, **opts):
    """(loss, dE, dC) of the loss plus ``_z_loss`` times the sum of squared LSEs."""
    leaves = [x.detach().requires_grad_() for x in (e, c)]
    opts = {"filter_eps": "tail", **opts}
    loss, lse = linear_cross_entropy(*leaves, y, impl="triton", return_lse=True, **opts)
    z_loss = _z_loss
    obj = loss + z_loss * lse.pow(2).sum()
    return (loss.detach(), *torch.autograd.grad(obj, leaves))


def _spy_tail_plans(monkeypatch) -> list:
    plans, real = [], vpcce.kernels.tail_plan

    def spy(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(vpcce.kernels, "tail_plan", spy)
    return plans


def test_tile_lse_is_each_tiles_log_sum_exp():
    e, c, y = _peaked()
    layout = make_layout(e, y, 0)
    tile_lse = vpcce.kernels.tile_lse_buffer(layout.num_tokens, c)
    vpcce.kernels.forward_partials(
        layout, c, None, vocab_start=0, logit_scale=1.0, softcap=None, tile_lse=tile_lse
    )
    z = e.double() @ c.double().T
    bv = blocks(c.dtype).v
    want = torch.stack([z[:, i : i + bv].logsumexp(dim=1) for i in range(0, c.shape[0], bv)])
    assert torch.allclose(tile_lse.double(), want, rtol=1e-6, atol=1e-5)


def _forward_plan(e, c, y, share):
    """``(lse, skip, mass)``: the forward with its per-tile LSE, then the tail's plan."""
    n, v = y.numel(), c.shape[0]
    tile_lse = vpcce.kernels.tile_lse_buffer(n, c)
    parts = vpcce.kernels.forward_partials(
        make_layout(e, y, 0), c, None, vocab_start=0, logit_scale=1.0, softcap=None,
        tile_lse=tile_lse,
    )  # fmt: skip
    lse = finalize(parts, v, 0.0)[0]
    skip, mass = vpcce.kernels.tail_plan(
        tile_lse, lse, y, vocab_start=0, vocab=v, vocab_size=v, share=share, dtype=c.dtype
    )
    return lse, skip, mass


def test_plan_skips_light_tiles_without_targets_and_sums_their_mass():
    e, c, y = _peaked()
    n, v = y.numel(), c.shape[0]
    share = 0.5
    lse, skip, mass = _forward_plan(e, c, y, share)
    bn, bv = blocks(c.dtype).n, blocks(c.dtype).v
    z = e.double() @ c.double().T
    p = torch.softmax(z, dim=1)
    tiles = -(-v // bv)
    tile_mass = torch.zeros(n, tiles, dtype=torch.float64, device=e.device)
    tile_mass.index_add_(1, torch.arange(v, device=e.device) // bv, p)
    blocks_ = -(-n // bn)
    padded = torch.zeros(blocks_ * bn, tiles, dtype=torch.float64, device=e.device)
    padded[:n] = tile_mass
    block_max = padded.view(blocks_, bn, tiles).amax(dim=1)
    has_target = torch.zeros(blocks_, tiles, dtype=torch.bool, device=e.device)
    has_target[torch.arange(n, device=e.device) // bn, y // bv] = True
    want = (block_max < share * bv / v) & ~has_target
    assert 0 < want.sum() < want.numel()
    assert torch.equal(skip.bool(), want)
    token_skip = want.repeat_interleave(bn, dim=0)[:n]
    assert torch.allclose(mass.double(), (tile_mass * token_skip).sum(1), rtol=1e-5, atol=1e-9)


def _expected(e, c, y, skip, *, label_smoothing=0.0, logit_scale=1.0, z_loss=0.0):
    """fp64 gradients of the loss when the skipped tiles' dz is replaced by its row sum times the
    mean classifier row (dE) and by that sum spread evenly over the skipped columns (dC)."""
    e64, c64 = e.double(), c.double()
    z = (e64 @ c64.T).requires_grad_()
    logits = z * logit_scale
    obj = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if z_loss:
        obj = obj + z_loss * logits.logsumexp(dim=1).pow(2).sum()
    (dz,) = torch.autograd.grad(obj, z)
    bn, bv = blocks(c.dtype).n, blocks(c.dtype).v
    n, v = dz.shape
    dropped = skip.bool().repeat_interleave(bn, 0)[:n].repeat_interleave(bv, 1)[:, :v]
    kept = torch.where(dropped, 0.0, dz)
    skipped = torch.where(dropped, dz, 0.0).sum(1, keepdim=True)
    de = kept @ c64 + skipped * c64.mean(0)
    spread = torch.where(dropped, skipped / dropped.sum(1, keepdim=True).clamp(min=1), 0.0)
    return de, (kept + spread).T @ e64


@pytest.mark.parametrize(
    "dtype,opts",
    [
        ("fp32", {}),
        ("fp32", {"label_smoothing": 0.1, "logit_scale": 1.3}),
        ("fp32", {"_z_loss": 1e-2}),
        ("bf16", {}),
    ],
)
def test_tail_backward_is_kept_tiles_plus_first_moment(dtype, opts, monkeypatch):
    if not tile_summary.supported(DTYPES[dtype], N, V):
        pytest.skip("the forward's tiles are not the backward's for these inputs: no summary")
    e, c, y = _peaked(DTYPES[dtype])
    monkeypatch.setattr(backward_module, "MIN_TAIL_SKIPPED", 0.0)
    plans = _spy_tail_plans(monkeypatch)
    loss, de, dc = _grads(e, c, y, **opts)
    assert len(plans) == 1
    skip = plans[0][0]
    assert 0 < skip.sum() < skip.numel()
    exact = _grads(e, c, y, filter_eps=None, **opts)
    assert torch.equal(loss, exact[0])  # the forward is the same computation
    want_de, want_dc = _expected(
        e, c, y, skip, label_smoothing=opts.get("label_smoothing", 0.0),
        logit_scale=opts.get("logit_scale", 1.0), z_loss=opts.get("_z_loss", 0.0),
    )  # fmt: skip
    tol = 1e-5 if dtype == "fp32" else 1e-2
    assert rel_err(de, want_de) < tol and rel_err(dc, want_dc) < tol
    # and it is not the exact gradient: the tail was skipped
    assert rel_err(dc, exact[2]) > (1e-4 if dtype == "fp32" else 3e-3)


def test_thin_tail_stays_exact(monkeypatch):
    """Below `MIN_TAIL_SKIPPED` of the tiles the backward is the exact one, bit for bit."""
    e, c, y = _peaked(torch.bfloat16)
    plans = _spy_tail_plans(monkeypatch)
    monkeypatch.setattr(backward_module, "MIN_TAIL_SKIPPED", 1.0)
    got = _grads(e, c, y)
    assert len(plans) == 1 and plans[0][0].float().mean() < 1.0
    for x, want in zip(got, _grads(e, c, y, filter_eps=None), strict=True):
        assert torch.equal(x, want)


def test_no_tail_where_it_does_not_apply(monkeypatch):
    """Exact: under a bias, a softcap, a gradient the filter may not touch, a float filter, or
    an exact impl."""
    e, c, y = _peaked()
    plans = _spy_tail_plans(monkeypatch)
    bias = torch.zeros(c.shape[0], device=DEVICE)
    tail = {"impl": "triton", "filter_eps": "tail"}
    linear_cross_entropy(e, c, y, bias, **tail)
    linear_cross_entropy(e, c, y, softcap=30.0, **tail)
    linear_cross_entropy(e, c, y, filter_e_grad=False, **tail)
    linear_cross_entropy(e, c, y, impl="triton", filter_eps=1e-3)
    linear_cross_entropy(e, c, y, impl="cce_exact", filter_eps="tail")
    assert plans == []
    mode = function_module.BackwardMode(tail_share=0.5)
    assert function_module.uses_tile_summaries("triton", mode, c.dtype, False, N, V) == "lse"
    assert function_module.uses_tile_summaries("torch", mode, c.dtype, False, N, V) is None


def _spy_gate(monkeypatch) -> list:
    verdicts, real = [], backward_module.beats_baseline

    def spy(*args, **kwargs):
        verdicts.append(real(*args, **kwargs))
        return verdicts[-1]

    monkeypatch.setattr(backward_module, "beats_baseline", spy)
    return verdicts


# the gate's own math is device-agnostic torch; these two data sets were sized for the
# interpreter's 32 x 64 tiles (the GPU's 128 x 256 ones see another tail on them)
interpreter_tiles = pytest.mark.skipif(DEVICE != "cpu", reason="data sized for 32 x 64 tiles")


@interpreter_tiles
def test_gate_keeps_a_small_head_exact(monkeypatch):
    """``"auto"`` on LM-like data at 1 nat on a small head (D 64, V 8192): the correction would
    lose to the baseline (fp64: hidden-gradient error 1.8e-2 against 1.1e-2), the sample shows
    it, and the backward stays exact, bit for bit."""
    batch = lm_like(256, 64, 8192, entropy=1.0, seed=5)
    e, c, y = (x.to(DEVICE) for x in (batch.e, batch.c, batch.targets))
    plans, verdicts = _spy_tail_plans(monkeypatch), _spy_gate(monkeypatch)
    monkeypatch.setattr(backward_module, "MIN_TAIL_SKIPPED", 0.0)
    got = _grads(e, c, y, filter_eps="auto")
    assert plans[0][0].float().mean().item() > 0.05 and verdicts == [False]
    for x, want in zip(got, _grads(e, c, y, filter_eps=None), strict=True):
        assert torch.equal(x, want)


@interpreter_tiles
def test_sample_of_every_token_measures_the_batch_errors(monkeypatch):
    """With the whole batch as its sample, the gate's estimates are the errors themselves: the
    tail's against the fp64 model of `_expected`, the baseline's against its materialized bf16
    gradients (dC: the diagonal alone, so at most the true error)."""
    batch = lm_like(128, 64, 4096, entropy=1.0, seed=7)
    e, c, y = (x.to(DEVICE) for x in (batch.e, batch.c, batch.targets))
    n = y.numel()
    lse, skip, mass = _forward_plan(e, c, y, 1.0)
    assert skip.float().mean() > 0.2
    monkeypatch.setattr(tail, "SAMPLE_TOKENS", n)
    cfg = blocks(c.dtype)
    tail_e, base_e, tail_c, base_c = tail.sample_errors(
        e, c, tail.mean_row(c), y, torch.ones_like(y, dtype=torch.bool), lse, skip, mass,
        block_n=cfg.n, block_v=cfg.v,
    )  # fmt: skip
    tru, base = truth(e, c, y, reduction="sum"), bf16_baseline(e, c, y, reduction="sum")
    model_de, model_dc = _expected(e, c, y, skip)  # of the mean: times n for the sum
    assert rel_err(tail_e, ((model_de - tru.de / n) * n).norm()) < 1e-2
    assert rel_err(tail_c, ((model_dc - tru.dc / n) * n).norm()) < 1e-2
    assert rel_err(base_e, (base.de.double() - tru.de).norm()) < 5e-2
    assert base_c <= (base.dc.double() - tru.dc).norm() * 1.05


def test_checked_tail_gate_verdict():
    """The gate passes only when both sample errors are within `ERROR_FRACTION` of the
    baseline's (None: fp32 inputs, no baseline to beat)."""
    one = torch.tensor(1.0)
    for errors, want in (
        ((0.4 * one, one, 0.4 * one, one), True),
        ((0.6 * one, one, 0.1 * one, one), False),
        ((0.1 * one, one, 0.6 * one, one), False),
        (None, False),
    ):
        assert tail.beats_baseline(errors) is want


def test_checked_tail_stays_exact_on_a_vocabulary_shard(monkeypatch):
    """Vocab-parallel: the check's baseline needs the whole vocabulary's softmax, so ``"auto"``
    keeps no tail summary on a shard (``"tail"`` still does: unchecked)."""
    e, c, y = _peaked(torch.bfloat16)
    options = dict(
        ignore_index=-100, softcap=None, reduction="mean", shift=0, accum_e_fp32=False,
        accum_c_fp32=False, filter_e_grad=True, filter_c_grad=True, impl="triton",
        label_smoothing=0.0, logit_scale=1.0, validate=False, chunk_bytes=None,
    )  # fmt: skip
    auto, unchecked = (
        loss_config(e, c, y, None, None, filter_eps=f, **options) for f in ("auto", "tail")
    )
    assert function_module._summary_kind(auto, c, False, N) == "lse"
    monkeypatch.setattr(function_module, "_distributed", lambda cfg: True)
    assert function_module._summary_kind(auto, c, False, N) is None
    assert function_module._summary_kind(unchecked, c, False, N) == "lse"
