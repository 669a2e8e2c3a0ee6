"""bf16 dz rounds stochastically with a per-column dither (`vpcce.kernels.common.STOCHASTIC_DZ`):
deterministic, unbiased over a token's columns. The Triton kernel in the interpreter on CPU;
with a GPU, the compiled kernels (the Hopper dlogits kernel on an H100 / H200): CUDA tests."""

import pytest
import torch
from test_target_dz import _backward_fp32_grad, _captured_chunks
from truth import rel_err, truth

from vpcce.kernels import common
from vpcce.kernels.common import interpreting

DEVICE = "cpu" if interpreting() else "cuda"
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []


def _uniform(n=32, d=64, v=1000):
    """All logits 0: every token's dz is ``1 / (N V)`` in every column but its target's, a value
    bf16 does not hold; C's rows share a mean, so a rounding bias adds up coherently in dE."""
    g = torch.Generator().manual_seed(5)
    c = (torch.randn(v, d, generator=g) + 1.0).to(torch.bfloat16)
    e = torch.zeros(1, n, d, dtype=torch.bfloat16)
    y = torch.randint(0, v, (1, n), generator=g)
    return e.to(DEVICE), c.to(DEVICE), y.to(DEVICE)


def test_each_entry_is_a_neighbour_and_the_columns_average_out(monkeypatch):
    e, c, y = _uniform()
    n, v = y.numel(), c.shape[0]
    got = _captured_chunks(monkeypatch)
    _backward_fp32_grad(e, c, y)
    exact = 1.0 / (n * v)
    nearest = torch.tensor(exact).to(torch.bfloat16)
    step = -1 if float(nearest) > exact else 1  # to the other neighbour, in bf16 bit patterns
    other = (nearest.view(torch.int16) + step).view(torch.bfloat16)
    below, above = sorted((float(nearest), float(other)))
    values = []
    for dz, v0 in got["chunks"]:
        cols = torch.arange(v0, v0 + dz.shape[1], device=DEVICE)
        others = cols[None, :] != y.view(-1, 1)
        values.append(dz.double()[others])
    values = torch.cat(values).cpu()
    assert ((values == below) | (values == above)).all()
    assert (values == below).any() and (values == above).any()
    # unbiased: the mean is off by a small fraction of round-to-nearest's error (0.07 ulp here;
    # measured ~0.001 ulp)
    assert abs(values.mean() - exact) < 0.2 * abs(float(nearest) - exact)
    # and so is each column's over the tokens (for dC): a dither of the column alone rounds all
    # of a column's equal entries the same way, up by 0.93 ulp in ~7% of the columns
    ulp = above - below
    worst = 0.0
    for dz, v0 in got["chunks"]:
        for j in range(dz.shape[1]):
            col = dz[:, j][y.view(-1) != v0 + j].double()
            worst = max(worst, abs(col.mean().item() - exact))
    assert worst < 0.25 * ulp, worst / ulp


def test_no_coherent_bias_in_the_hidden_gradient(monkeypatch):
    """dE (fp32, no final rounding) against the fp64 truth, and the error round-to-nearest
    would give: its bias times C's column sum, for every token."""
    e, c, y = _uniform()
    n, v = y.numel(), c.shape[0]
    tru = truth(e, c, y)
    exact = 1.0 / (n * v)
    bias = float(torch.tensor(exact).to(torch.bfloat16)) - exact
    rne = ((bias * c.double().sum(dim=0)).norm() * n**0.5 / tru.de.norm()).item()
    got = rel_err(_backward_fp32_grad(e, c, y), tru.de)
    assert got < 0.25 * rne, (got, rne)
    monkeypatch.setattr(common, "STOCHASTIC_DZ", False)  # the interpreter then truncates: to
    # the nearest neighbour here, so the estimate holds
    assert rel_err(_backward_fp32_grad(e, c, y), tru.de) > 0.8 * rne


def test_deterministic():
    e, c, y = _uniform()
    assert torch.equal(_backward_fp32_grad(e, c, y), _backward_fp32_grad(e, c, y))


def test_a_shard_rounds_its_columns_as_the_whole_vocabulary(monkeypatch):
    """The dither follows the global vocabulary id: a vocab-parallel shard's dz columns are the
    single-rank dz's, bit for bit (peaked data, so the entries differ)."""
    from test_target_dz import _inputs

    import vpcce.kernels
    from vpcce.layout import make_layout
    from vpcce.modes import BackwardMode

    e, c, y = (t.to(DEVICE) for t in _inputs(torch.bfloat16, v=300))
    layout = make_layout(e, y, 0)
    n = layout.num_tokens
    z = layout.e3.reshape(n, -1).float() @ c.float().T
    lse, z_target = torch.logsumexp(z, dim=1), z.gather(1, layout.flat_targets()[:, None])[:, 0]

    def dz_columns(start, stop):
        got = _captured_chunks(monkeypatch)
        vpcce.kernels.backward(
            layout, torch.empty_like(layout.e3), c[start:stop], None, lse=lse, z_target=z_target,
            g_nll=torch.full((n,), 1 / n, device=DEVICE), g_lse=None, vocab_start=start,
            target_weight=1.0, uniform_weight=0.0, logit_scale=1.0, softcap=None,
            mode=BackwardMode(),
        )  # fmt: skip
        monkeypatch.undo()
        columns = {}
        for dz, row in got["chunks"]:
            for j in range(dz.shape[1]):
                columns[row + j] = dz[:, j]
        return columns

    whole, shard = dz_columns(0, 300), dz_columns(100, 230)
    assert sorted(shard) == list(range(100, 230))
    assert all(torch.equal(shard[v], whole[v]) for v in shard)


def test_nan_stays_nan():
    """A NaN hidden state poisons its token's dz row, so every dC row and that token's dE row
    (on the GPU, NaN's bits 0x7FFFFFFF plus a dither carried into the sign: -0.0)."""
    from vpcce import linear_cross_entropy

    e, c, y = _uniform()
    e = e.clone()
    e[0, 3, 5] = float("nan")
    leaves = [x.detach().requires_grad_() for x in (e, c)]
    loss = linear_cross_entropy(*leaves, y, impl="triton", reduction="none")
    de, dc = torch.autograd.grad(loss.sum(), leaves)
    assert dc.isnan().all() and de[0, 3].isnan().all()
