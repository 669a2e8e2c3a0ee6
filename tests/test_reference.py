"""The exact PyTorch reference (``impl="torch"``) against an fp64 truth and PyTorch semantics.

Tolerance table: fp32 inputs are compared with the fp64 truth of the same fp32 values; bf16 inputs
are held to the materialized bf16 baseline's error against that truth (`BF16_SLACK`).
"""

from __future__ import annotations

import random
from itertools import combinations, product

import pytest
import torch
import torch.nn.functional as F
from memtrack import MemTracker
from truth import bf16_baseline, logits_of, objective, paired, rel_err, truth

from vpcce import LinearCrossEntropy, linear_cross_entropy
from vpcce.layout import make_layout
from vpcce.modes import BackwardMode, resolve_impl
from vpcce.reference import chunk_sizes

D, V = 264, 301  # D > 256; V = 7 * 43 is no multiple of a power-of-two block
IGNORE = -100
Z_LOSS = 1e-3
SMALL_CHUNK = 40_000  # (16 tokens x 9 vocab) tiles at D=264: several token and vocab chunks
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# rel_err vs the fp64 truth, fp32 inputs (the loss also covers the LSE)
FP32_TOL = {"loss": 1e-6, "grad": 1e-5}
# bf16 inputs: reference error <= baseline error * factor + slack
BF16_SLACK = (1.1, 1e-6)
# bf16 inputs are upcast exactly and reduced in fp32: loss / LSE stay near fp32 accuracy, and a
# gradient is off by little more than its final rounding to bf16 (2^-9 relative at most)
BF16_ABS = {"loss": 1e-5, "grad": 1e-2}


# ---------------------------------------------------------------------------------------------
# option matrix: the full product of the core axes, the other axes chosen to cover every pair
# ---------------------------------------------------------------------------------------------

AXES = {
    "dtype": ("fp32", "bf16"),
    "reduction": ("mean", "sum", "none"),
    "shift": (0, 1, 3),
    "ignored": (0.0, 0.3, 1.0),
    "bias": (False, True),
    "softcap": (None, 5.0),
    "lse": (False, True),  # return_lse, differentiated through a z-loss
    "label_smoothing": (0.0, 0.1),
    "logit_scale": (1.0, 0.5),
    "lead": ((2,), (2, 3)),  # e is (*lead, T, D)
    "chunk_bytes": (None, SMALL_CHUNK),
}
CORE = ("dtype", "reduction", "shift", "ignored", "bias")  # 108 combinations


def _pairs(row: dict) -> set:
    return {(a, row[a], b, row[b]) for a, b in combinations(AXES, 2)}


def _all_pairs() -> set:
    return {(a, va, b, vb) for a, b in combinations(AXES, 2) for va in AXES[a] for vb in AXES[b]}


def _matrix() -> list[dict]:
    """Greedy pairwise covering (AETG-style), deterministic: each core combination gets the free
    values, among 32 seeded random candidates, that cover the most still-uncovered pairs."""
    rng = random.Random(0)
    free = [a for a in AXES if a not in CORE]
    uncovered, rows = _all_pairs(), []

    def add(base: dict) -> None:
        cands = [
            dict(base, **{a: rng.choice(AXES[a]) for a in free if a not in base}) for _ in range(32)
        ]
        best = max(cands, key=lambda r: len(_pairs(r) & uncovered))
        uncovered.difference_update(_pairs(best))
        rows.append(best)

    for core in product(*(AXES[a] for a in CORE)):
        add(dict(zip(CORE, core, strict=True)))
    while uncovered:  # pairs the core rows missed: one row per missing pair
        a, va, b, vb = min(uncovered, key=repr)
        add({**{c: rng.choice(AXES[c]) for c in CORE}, a: va, b: vb})
    return rows


def _case_id(r: dict) -> str:
    parts = [r["dtype"], r["reduction"], f"shift{r['shift']}", f"ign{r['ignored']}"]
    parts += ["bias"] * r["bias"] + [f"cap{r['softcap']}"] * (r["softcap"] is not None)
    parts += ["zloss"] * r["lse"] + [f"ls{r['label_smoothing']}"] * bool(r["label_smoothing"])
    parts += [f"scale{r['logit_scale']}"] * (r["logit_scale"] != 1.0)
    parts += ["x".join(map(str, (*r["lead"], 9)))]
    parts += ["chunked"] * (r["chunk_bytes"] is not None)
    return "-".join(parts)


MATRIX = _matrix()


def make_inputs(lead=(2,), t=9, d=D, v=V, *, dtype=torch.float32, bias=False, ignored=0.0, seed=0):
    """Logits of standard deviation ~2 (so softmax is neither flat nor one-hot); ``ignored``: the
    fraction of targets set to `IGNORE`."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(*lead, t, d, generator=g).to(dtype)
    c = (torch.randn(v, d, generator=g) * (2 / d**0.5)).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, v, (*lead, t), generator=g)
    n_ign = round(ignored * y.numel())
    y.view(-1)[torch.randperm(y.numel(), generator=g)[:n_ign]] = IGNORE
    return e, c, b, y


def run_ref(e, c, y, b=None, *, z_loss=0.0, grad_weight=None, **opts):
    """vpcce's ``impl="torch"`` with the same objective as `truth` (loss [+ z-loss on the LSE])."""
    e_ = e.detach().clone().requires_grad_()
    c_ = c.detach().clone().requires_grad_()
    b_ = None if b is None else b.detach().clone().requires_grad_()
    out = linear_cross_entropy(e_, c_, y, b_, impl="torch", return_lse=True, **opts)
    loss, lse = out
    _, yp = paired(e, y, opts.get("shift", 0))
    obj = objective(
        loss,
        lse,
        yp != opts.get("ignore_index", IGNORE),
        reduction=opts.get("reduction", "mean"),
        z_loss=z_loss,
        grad_weight=grad_weight,
    )
    obj.backward()
    return loss.detach(), lse.detach(), e_.grad, c_.grad, None if b_ is None else b_.grad


def test_matrix_covers_every_pair():
    covered = set().union(*(_pairs(r) for r in MATRIX))
    assert covered == _all_pairs()
    core = {tuple(r[a] for a in CORE) for r in MATRIX}
    assert core == set(product(*(AXES[a] for a in CORE)))  # the full core product
    assert len(MATRIX) <= 120


@pytest.mark.parametrize("seed,case", enumerate(MATRIX), ids=[_case_id(r) for r in MATRIX])
def test_matrix(seed, case):
    dtype = DTYPES[case["dtype"]]
    e, c, b, y = make_inputs(
        case["lead"],
        dtype=dtype,
        bias=case["bias"],
        ignored=case["ignored"],
        seed=seed,
    )
    opts = dict(
        reduction=case["reduction"],
        shift=case["shift"],
        softcap=case["softcap"],
        label_smoothing=case["label_smoothing"],
        logit_scale=case["logit_scale"],
    )
    z_loss = Z_LOSS if case["lse"] else 0.0
    out_shape = (*case["lead"], 9 - case["shift"])
    w = (
        torch.rand(out_shape, generator=torch.Generator().manual_seed(1))
        if case["reduction"] == "none"
        else None
    )
    ref = run_ref(e, c, y, b, z_loss=z_loss, grad_weight=w, chunk_bytes=case["chunk_bytes"], **opts)
    tru = truth(e, c, y, b, z_loss=z_loss, grad_weight=w, **opts)

    loss, lse, de, dc, db = ref
    # dtypes and shapes of the contract
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert loss.shape == (out_shape if case["reduction"] == "none" else ())
    assert lse.shape == out_shape
    assert de.dtype == dc.dtype == dtype and de.shape == e.shape and dc.shape == c.shape
    assert (db is None) == (b is None) and (db is None or db.dtype == dtype)

    named = [
        ("loss", loss, tru.loss),
        ("lse", lse, tru.lse),
        ("de", de, tru.de),
        ("dc", dc, tru.dc),
    ]
    if b is not None:
        named.append(("dbias", db, tru.dbias))
    if dtype == torch.float32:
        for name, x, t in named:
            tol = FP32_TOL["loss" if name in ("loss", "lse") else "grad"]
            assert rel_err(x, t) <= tol, (name, rel_err(x, t))
    else:
        base = bf16_baseline(e, c, y, b, z_loss=z_loss, grad_weight=w, **opts)
        base_of = {
            "loss": base.loss,
            "lse": base.lse,
            "de": base.de,
            "dc": base.dc,
            "dbias": base.dbias,
        }
        factor, slack = BF16_SLACK
        for name, x, t in named:
            err, base_err = rel_err(x, t), rel_err(base_of[name], t)
            assert err <= base_err * factor + slack, (name, err, base_err)
            assert err <= BF16_ABS["loss" if name in ("loss", "lse") else "grad"], (name, err)


def test_small_chunks_walk_several_tiles():
    # the chunked matrix cases really walk several vocab chunks, and several token chunks for N > 16
    for lead in AXES["lead"]:
        n = 9 * int(torch.tensor(lead).prod())
        nc, vc = chunk_sizes(n, V, D, SMALL_CHUNK)
        assert nc < n and vc < V, (n, nc, vc)


def test_tiny_chunks_all_options():
    """One vocabulary row per tile and 5 tokens per tile; every option on."""
    e, c, b, y = make_inputs((2, 3), bias=True, ignored=0.3, seed=7)
    opts = dict(reduction="mean", shift=2, softcap=5.0, label_smoothing=0.1, logit_scale=0.5)
    assert chunk_sizes(2 * 3 * 7, V, D, 8_000) == (5, 1)
    ref = run_ref(e, c, y, b, z_loss=0.1, chunk_bytes=8_000, **opts)
    tru = truth(e, c, y, b, z_loss=0.1, **opts)
    for x, t, tol in zip(ref, tru, (1e-6, 1e-6, 1e-5, 1e-5, 1e-5), strict=True):
        assert rel_err(x, t) <= tol


# ---------------------------------------------------------------------------------------------
# gradients, shapes and edge cases
# ---------------------------------------------------------------------------------------------


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, 2] = IGNORE

    def f(e, c, b):
        return linear_cross_entropy(
            e,
            c,
            y,
            b,
            impl="torch",
            softcap=2.0,
            label_smoothing=0.1,
            shift=1,
            logit_scale=0.7,
            reduction="none",
            return_lse=True,
            chunk_bytes=2_000,
        )

    assert torch.autograd.gradcheck(f, (e, c, b))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradient_of_the_gradient_raises(impl):
    """``create_graph=True`` gives the usual gradients, and the graph of other terms works, but a
    backward through vpcce's gradient raises (it would be wrong: the implementations' gradients
    are not differentiable functions of the inputs)."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(6, 4, generator=g, requires_grad=True)
    c = torch.randn(9, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=g)
    w = torch.randn(3, generator=g, requires_grad=True)  # a term of the loss that vpcce is not
    expected = torch.autograd.grad(linear_cross_entropy(e, c, y, impl=impl), (e, c))
    loss = linear_cross_entropy(e, c, y, impl=impl) + w.pow(3).sum()
    de, dc, dw = torch.autograd.grad(loss, (e, c, w), create_graph=True)
    torch.testing.assert_close(de, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(dc, expected[1], rtol=0, atol=0)
    (d2w,) = torch.autograd.grad(dw.sum(), w, retain_graph=True)
    torch.testing.assert_close(d2w, 6 * w.detach())
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(dc.pow(2).sum() + e.sum(), e, retain_graph=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        (de.sum() + dc.sum()).backward()


def test_shift_pairs_views_without_copying_e():
    e, _, _, y = make_inputs((2, 3), d=16)
    layout = make_layout(e, y, 3)
    assert layout.e3.untyped_storage().data_ptr() == e.untyped_storage().data_ptr()
    assert layout.e3.data_ptr() == e.data_ptr() and layout.e3.shape == (6, 6, 16)
    assert layout.y2.data_ptr() == y[..., 3:].data_ptr()
    # forward with shift allocates only chunk-sized copies of e, not a shifted copy of it
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4, 2048, 256, generator=g)  # 8 MiB
    c = torch.randn(33, 256, generator=g)
    y = torch.randint(0, 33, (4, 2048), generator=g)
    with torch.no_grad(), MemTracker() as mem:
        linear_cross_entropy(e, c, y, impl="torch", shift=1, chunk_bytes=2**18)
    # 256 KiB tiles plus per-token vectors (~0.5 MB); a shifted copy of e alone would be 8 MiB
    assert mem.peak < e.nbytes / 8, mem.peak


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [IGNORE, 5], ids=["ign-100", "ign5-in-vocab"])
def test_ignored_tokens_contribute_nothing(reduction, ignore_index):
    e, c, _, y = make_inputs(ignored=0.0, seed=3)
    y[0, :4] = ignore_index
    y[1, 7] = ignore_index
    valid = y != ignore_index
    e.requires_grad_()
    loss = linear_cross_entropy(
        e, c, y, impl="torch", ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1
    )
    per_token = linear_cross_entropy(
        e, c, y, impl="torch", ignore_index=ignore_index, reduction="none", label_smoothing=0.1
    )
    assert (per_token[~valid] == 0).all() and (per_token[valid] > 0).all()
    expected = {"mean": per_token.sum() / valid.sum(), "sum": per_token.sum(), "none": per_token}[
        reduction
    ]
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(loss.sum(), e)
    assert (grad[~valid] == 0).all() and (grad[valid] != 0).any(dim=-1).all()
    # changing ignored tokens' hidden states changes nothing
    e2 = e.detach().clone()
    e2[~valid] = torch.randn_like(e2[~valid]) * 10
    loss2 = linear_cross_entropy(
        e2, c, y, impl="torch", ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1
    )
    torch.testing.assert_close(loss2, loss.detach(), rtol=0, atol=0)
    tru = truth(e, c, y, ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1)
    assert rel_err(loss, tru.loss) <= FP32_TOL["loss"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradients(reduction):
    e, c, b, y = make_inputs(bias=True, ignored=1.0)
    e.requires_grad_()
    c.requires_grad_()
    b.requires_grad_()
    loss = linear_cross_entropy(e, c, y, b, impl="torch", reduction=reduction, label_smoothing=0.1)
    assert not torch.isnan(loss).any() and (loss == 0).all()
    loss.sum().backward()
    for g in (e.grad, c.grad, b.grad):
        assert g is not None and (g == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "e_shape,shift",
    [((0, 8), 0), ((2, 0, 8), 0), ((2, 3, 8), 3), ((0, 4, 8), 1)],
    ids=["0xD", "2x0xD", "2x3xD-shift3", "0x4xD-shift1"],
)
def test_no_tokens(e_shape, shift, reduction):
    e = torch.randn(e_shape, requires_grad=True)
    c = torch.randn(5, 8, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    y = torch.randint(0, 5, e_shape[:-1])
    loss, lse = linear_cross_entropy(
        e,
        c,
        y,
        b,
        impl="torch",
        reduction=reduction,
        shift=shift,
        return_lse=True,
        label_smoothing=0.1,
    )
    out_shape = (*e_shape[:-2], e_shape[-2] - shift) if len(e_shape) > 2 else (0,)
    assert lse.shape == out_shape
    assert loss.shape == (out_shape if reduction == "none" else ())
    assert not torch.isnan(loss).any() and (loss == 0).all()
    (loss.sum() + lse.sum()).backward()
    assert e.grad.shape == e.shape and (e.grad == 0).all()
    assert (c.grad == 0).all() and (b.grad == 0).all()


def test_noncontiguous_inputs_match_contiguous():
    g = torch.Generator().manual_seed(5)
    # c stored transposed, e a permuted slice with non-mergeable leading dims, targets transposed
    c_nc = torch.randn(D + 3, V, generator=g)[:D].T * (2 / D**0.5)
    e_nc = torch.randn(9, 2, 3, 2 * D, generator=g).permute(2, 1, 0, 3)[..., ::2]
    y_nc = torch.randint(0, V, (9, 2, 3), generator=g).permute(2, 1, 0)
    b_nc = torch.randn(2 * V, generator=g)[::2]
    y_nc[0, 0, 4] = IGNORE
    assert not any(x.is_contiguous() for x in (c_nc, e_nc, y_nc, b_nc))
    opts = dict(shift=1, softcap=5.0, label_smoothing=0.1, reduction="none")
    w = torch.rand(3, 2, 8, generator=g)
    got = run_ref(
        e_nc, c_nc, y_nc, b_nc, z_loss=0.1, grad_weight=w, chunk_bytes=SMALL_CHUNK, **opts
    )
    want = run_ref(
        e_nc.contiguous(),
        c_nc.contiguous(),
        y_nc.contiguous(),
        b_nc.contiguous(),
        z_loss=0.1,
        grad_weight=w,
        chunk_bytes=SMALL_CHUNK,
        **opts,
    )
    tru = truth(e_nc, c_nc, y_nc, b_nc, z_loss=0.1, grad_weight=w, **opts)
    for x, ref, t in zip(got, want, tru, strict=True):
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6)
        assert rel_err(x, t) <= FP32_TOL["grad"]


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_inf_in_e_propagate(bad, reduction):
    e, c, _, y = make_inputs(seed=2)
    e[0, 3, 7] = float(bad)
    e.requires_grad_()
    loss = linear_cross_entropy(e, c, y, impl="torch", reduction=reduction)
    loss.sum().backward()  # no exception
    poisoned = loss if reduction == "mean" else loss[0, 3]
    assert torch.isnan(poisoned)  # as F.cross_entropy: an inf hidden state gives inf - inf logits
    if reduction == "none":  # other tokens are untouched
        clean = torch.ones_like(loss, dtype=torch.bool)
        clean[0, 3] = False
        assert torch.isfinite(loss[clean]).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lse_shape_dtype_and_backward(dtype):
    e, c, b, y = make_inputs((2, 3), dtype=DTYPES[dtype], bias=True, ignored=0.3, seed=11)
    opts = dict(shift=3, softcap=5.0, logit_scale=0.5, label_smoothing=0.1)
    loss, lse = linear_cross_entropy(e, c, y, b, impl="torch", return_lse=True, **opts)
    assert lse.shape == (2, 3, 6) and lse.dtype == torch.float32 and loss.dtype == torch.float32
    assert lse.requires_grad is False  # no input requires grad
    # only the LSE is differentiated: checks the LSE backward on its own
    e.requires_grad_()
    c.requires_grad_()
    b.requires_grad_()
    w = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(0))
    _, lse = linear_cross_entropy(e, c, y, b, impl="torch", return_lse=True, **opts)
    (lse * w).sum().backward()
    assert e.grad.dtype == c.grad.dtype == b.grad.dtype == DTYPES[dtype]
    # the truth: the same weighted sum of the fp64 LSE of the fp64 logits
    e64, c64, b64 = (x.detach().double().requires_grad_() for x in (e, c, b))
    ep, _ = paired(e64, y, 3)
    z = logits_of(ep, c64, b64, softcap=5.0, logit_scale=0.5)
    (torch.logsumexp(z, -1) * w).sum().backward()
    tol = FP32_TOL["grad"] if dtype == "fp32" else BF16_ABS["grad"]
    for x, t in ((e.grad, e64.grad), (c.grad, c64.grad), (b.grad, b64.grad)):
        assert rel_err(x, t) <= tol


def test_z_loss_backward_matches_truth():
    e, c, b, y = make_inputs((2,), bias=True, ignored=0.3, seed=4)
    opts = dict(shift=1, softcap=5.0, label_smoothing=0.1, reduction="mean")
    ref = run_ref(e, c, y, b, z_loss=0.1, **opts)
    tru = truth(e, c, y, b, z_loss=0.1, **opts)
    for x, t in zip(ref, tru, strict=True):
        assert rel_err(x, t) <= FP32_TOL["grad"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
def test_label_smoothing_matches_pytorch_fp64(alpha, reduction):
    e, c, b, y = make_inputs(bias=True, ignored=0.3, seed=9)
    e, c, b = e.double(), c.double(), b.double()
    got = linear_cross_entropy(e, c, y, b, impl="torch", label_smoothing=alpha, reduction=reduction)
    want = F.cross_entropy(
        (e @ c.T + b).transpose(1, 2),
        y,
        label_smoothing=alpha,
        ignore_index=IGNORE,
        reduction=reduction,
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_return_stats(dtype):
    e, c, b, y = make_inputs((2, 3), dtype=DTYPES[dtype], bias=True, ignored=0.3, seed=12)
    shift, opts = 1, dict(softcap=5.0, logit_scale=0.5)
    ep, yp = paired(e, y, shift)
    z64 = logits_of(ep.double(), c.double(), b.double(), **opts)
    top = z64.argmax(-1)
    # make some targets right so `correct` has both values
    yp[..., ::2] = torch.where(yp[..., ::2] == IGNORE, IGNORE, top[..., ::2])
    loss, stats = linear_cross_entropy(
        e, c, y, b, impl="torch", shift=shift, return_stats=True, chunk_bytes=SMALL_CHUNK, **opts
    )
    entropy64 = -(torch.softmax(z64, -1) * torch.log_softmax(z64, -1)).sum(-1)
    assert stats.entropy.dtype == torch.float32 and stats.entropy.shape == yp.shape
    assert rel_err(stats.entropy, entropy64) <= 1e-5
    assert stats.argmax.dtype == torch.int64 and torch.equal(stats.argmax, top)
    want = (top == yp) & (yp != IGNORE)
    assert stats.correct.dtype == torch.bool and torch.equal(stats.correct, want)
    assert want.any() and not want.all()


@pytest.mark.parametrize("chunk_bytes", [None, SMALL_CHUNK], ids=["one-tile", "chunked"])
def test_masked_vocabulary_minus_inf_bias(chunk_bytes):
    """A -inf bias masks vocabulary entries (padded vocabularies): they weigh 0, as in
    F.cross_entropy, even where a whole vocabulary chunk is masked."""
    e, c, b, y = make_inputs(bias=True, ignored=0.3, seed=15)
    b[200:] = float("-inf")  # many whole 9-row chunks when chunked
    b[17] = float("-inf")
    y[y >= 200] = 3
    y[y == 17] = 4
    opts = dict(reduction="sum", shift=1, label_smoothing=0.0, logit_scale=0.5)
    ref = run_ref(e, c, y, b, z_loss=0.1, chunk_bytes=chunk_bytes, **opts)
    tru = truth(e, c, y, b, z_loss=0.1, **opts)
    for x, t, tol in zip(ref, tru, (1e-6, 1e-6, 1e-5, 1e-5, 1e-5), strict=True):
        assert torch.isfinite(x).all() and rel_err(x, t) <= tol
    _, stats = linear_cross_entropy(
        e,
        c,
        y,
        b,
        impl="torch",
        return_stats=True,
        chunk_bytes=chunk_bytes,
        shift=1,
        logit_scale=0.5,
    )
    p64 = torch.softmax(
        logits_of(e[:, :-1].double(), c.double(), b.double(), softcap=None, logit_scale=0.5), -1
    )
    assert rel_err(stats.entropy, torch.special.entr(p64).sum(-1)) <= 1e-5
    assert (stats.argmax < 200).all() and (stats.argmax != 17).all()


def test_argmax_ties_pick_the_lowest_id():
    """Integer-valued inputs make exact ties; the duplicates sit in other vocabulary chunks."""
    g = torch.Generator().manual_seed(16)
    e = torch.randint(-2, 3, (2, 9, D), generator=g).float()
    c = torch.randint(-2, 3, (V, D), generator=g).float()
    y = torch.randint(0, V, (2, 9), generator=g)
    top = (e.double() @ c.double().T).argmax(-1)
    for i, t in enumerate(top.view(-1).tolist()):
        c[[i % 5, 290 + i % 7]] = c[
            t
        ].clone()  # an earlier and a later copy of each token's best row
    z = e.double() @ c.double().T
    assert ((z == z.max(-1, keepdim=True).values).sum(-1) > 1).any()
    for chunk_bytes in (None, SMALL_CHUNK, 8_000):
        _, stats = linear_cross_entropy(
            e, c, y, impl="torch", return_stats=True, chunk_bytes=chunk_bytes
        )
        assert torch.equal(stats.argmax, z.argmax(-1)), chunk_bytes


def test_module_equals_function():
    e, c, b, y = make_inputs(bias=True, ignored=0.3, seed=13)
    opts = dict(
        impl="torch",
        shift=1,
        softcap=5.0,
        label_smoothing=0.1,
        logit_scale=0.5,
        reduction="sum",
        return_lse=True,
        chunk_bytes=SMALL_CHUNK,
    )
    module = LinearCrossEntropy(**opts)
    got = module(e, c, y, b)
    want = linear_cross_entropy(e, c, y, b, **opts)
    for x, ref in zip(got, want, strict=True):
        torch.testing.assert_close(x, ref, rtol=0, atol=0)
    assert "softcap=5.0" in repr(module)


def test_module_rejects_unknown_options():
    with pytest.raises(TypeError, match="softcapp"):
        LinearCrossEntropy(softcapp=5.0)
    with pytest.raises(TypeError, match="bias"):
        LinearCrossEntropy(bias=None)  # a tensor argument, not an option


def test_apple_impl_aliases():
    cpu = torch.device("cpu")
    mode = BackwardMode(filter_eps=0.01, filter_e_grad=False)
    assert resolve_impl("torch_compile", cpu, mode) == ("torch", mode)
    assert resolve_impl("cce", cpu, mode) == ("triton", mode)
    assert resolve_impl("cce_exact", cpu, mode) == (
        "triton",
        BackwardMode(None, False, True, False, False),
    )
    for name in ("cce_kahan_full_c", "cce_kahan_full_e"):
        assert resolve_impl(name, cpu, mode) == (
            "triton",
            BackwardMode(None, False, True, True, True),
        )
    assert resolve_impl("auto", cpu, mode) == ("torch", mode)
    assert resolve_impl("torch", cpu, mode) == ("torch", mode)
    # torch_compile runs the exact reference on CPU
    e, c, b, y = make_inputs(bias=True, seed=14)
    got = linear_cross_entropy(e, c, y, b, impl="torch_compile", return_lse=True)
    want = linear_cross_entropy(e, c, y, b, impl="torch", return_lse=True)
    for x, ref in zip(got, want, strict=True):
        torch.testing.assert_close(x, ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# memory: chunked, never N x V
# ---------------------------------------------------------------------------------------------

MEM_N, MEM_V, MEM_D = 2048, 6000, 16
MEM_CHUNK = 4 * 2**20
# per-token vectors besides the tiles: [N, 6] partials and their merge, LSE, targets, masks, weights
PER_TOKEN_BYTES = 256


def _mem_inputs():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(MEM_N, MEM_D, generator=g, requires_grad=True)
    c = torch.randn(MEM_V, MEM_D, generator=g, requires_grad=True)
    y = torch.randint(0, MEM_V, (MEM_N,), generator=g)
    return e, c, y


def _mem_budget() -> int:
    """chunk_bytes + the documented fp32 accumulators ([N, D], [vocab chunk, D]) + the gradients."""
    _, vc = chunk_sizes(MEM_N, MEM_V, MEM_D, MEM_CHUNK)
    accumulators = 4 * MEM_N * MEM_D + 4 * vc * MEM_D
    gradients = 4 * MEM_N * MEM_D + 4 * MEM_V * MEM_D
    return MEM_CHUNK + accumulators + gradients + PER_TOKEN_BYTES * MEM_N


def test_memory_stays_within_chunk_budget():
    logits_bytes = MEM_N * MEM_V * 4
    assert logits_bytes >= 10 * MEM_CHUNK
    e, c, y = _mem_inputs()
    with MemTracker() as mem:
        loss = linear_cross_entropy(e, c, y, impl="torch", chunk_bytes=MEM_CHUNK)
        loss.backward()
    assert mem.peak <= _mem_budget(), (mem.peak, _mem_budget())
    assert mem.peak < logits_bytes / 4
    tru = truth(e, c, y)
    assert rel_err(loss, tru.loss) <= FP32_TOL["loss"]
    assert (
        rel_err(e.grad, tru.de) <= FP32_TOL["grad"] and rel_err(c.grad, tru.dc) <= FP32_TOL["grad"]
    )


def test_memory_check_catches_materialized_logits():
    e, c, y = _mem_inputs()
    with MemTracker() as mem:
        F.cross_entropy(e @ c.T, y).backward()
    assert mem.peak >= MEM_N * MEM_V * 4 > _mem_budget()
