"""The warp-specialized Hopper forward (`vpcce.kernels.forward_hopper`) against the Triton forward.

Both produce the same mergeable partials; on an H100 the bf16 path of `forward_partials` takes the
Hopper kernel, so the CUDA cases here compare it column by column with the Triton kernel
(`HOPPER_FORWARD_BLOCKS = None`) on awkward shapes: token, vocabulary and hidden sizes off the
tiles, a bias masking part of the vocabulary, softcap and scale, a shard offset, summaries.
"""

from dataclasses import replace

import pytest
import torch

from vpcce.kernels import common, forward_hopper
from vpcce.kernels.forward import forward_partials
from vpcce.layout import make_layout
from vpcce.partials import ARGMAX, MAX, SUMEXP, SUMZ, ZTARGET, argmax_column

HOPPER = common.HOPPER_FORWARD_BLOCKS


@pytest.mark.parametrize(
    ("tokens", "tiles", "want"),
    [(8192, 1000, 10), (16384, 501, 9), (1024, 1000, 16), (100, 3, 3), (8192, 14, 14)],
    ids=["gemma", "llama", "short", "few-tiles", "14-tiles"],
)
def test_num_splits_fills_whole_waves(tokens, tiles, want):
    splits = forward_hopper.num_splits(tokens, tiles, HOPPER, sms=132)
    assert splits == want
    # at most ~GROUP token blocks per wave of 132 programs (their E rows stay in L2)
    assert splits >= min(tiles, 132 // forward_hopper.GROUP)


@pytest.mark.parametrize(
    ("version", "ok"), [("3.6.0", True), ("3.6.1+git", True), ("3.9.0", False)]
)
def test_gluon_kernels_only_on_validated_triton(version, ok):
    # Triton 3.9's Gluon renamed the TMA copies: there the Triton kernels run instead
    assert forward_hopper.gluon_validated(version) is ok


def _partials(e, c, y, bias, hopper, **kw):
    saved = common.HOPPER_FORWARD_BLOCKS
    common.HOPPER_FORWARD_BLOCKS = hopper
    try:
        layout = make_layout(e, y, 0)
        tile_max = kw.pop("tile_max", None)
        parts = forward_partials(layout, c, bias, **kw, tile_max=tile_max)
        return parts, tile_max
    finally:
        common.HOPPER_FORWARD_BLOCKS = saved


CASES = {
    "plain": dict(n=1000, d=256, v=4096, bias=False, softcap=None, scale=1.0, start=0),
    "ragged": dict(n=300, d=200, v=1017, bias=True, softcap=None, scale=1.0, start=0),
    "softcap-scale": dict(n=257, d=320, v=5003, bias=False, softcap=15.0, scale=0.5, start=0),
    "shard": dict(n=640, d=128, v=2000, bias=True, softcap=30.0, scale=1.0, start=1500),
}


def _case_inputs(case):
    """``E``, ``C``, targets, bias and `forward_partials` options of a `CASES` entry."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = case["n"], case["d"], case["v"]
    e = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
    c = (torch.randn(v, d, device="cuda", generator=g) * 0.3).to(torch.bfloat16)
    c[7] = c[3]  # an exact tie in the max: the lower id wins
    e[5] = 0  # every logit of this token ties
    # global ids: some targets belong to other shards (below start, at or past start + v)
    y = torch.randint(0, case["start"] + v + 50, (n,), device="cuda", generator=g)
    bias = None
    if case["bias"]:
        bias = (0.1 * torch.randn(v, device="cuda", generator=g)).to(torch.bfloat16)
        bias[v // 3 : v // 3 + 300] = float("-inf")  # masked vocabulary
    kw = dict(vocab_start=case["start"], logit_scale=case["scale"], softcap=case["softcap"])
    return e, c, y, bias, kw


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("summary", [False, True], ids=["stats", "summary"])
@pytest.mark.parametrize("split", [1, 2], ids=["split1", "split2"])
def test_matches_triton_forward(case, summary, split, hopper):
    e, c, y, bias, kw = _case_inputs(case)
    n, v = case["n"], case["v"]
    if summary:
        kw["tile_max"] = torch.empty(-(-v // HOPPER.v), n, dtype=torch.bfloat16, device="cuda")
    got, got_max = _partials(e, c, y, bias, replace(HOPPER, split_every=split), **dict(kw))
    if summary:
        kw["tile_max"] = torch.empty_like(got_max)
    want, want_max = _partials(e, c, y, bias, None, **dict(kw))
    assert torch.equal(argmax_column(got), argmax_column(want))
    # other chain lengths and summation orders round differently: fp32 noise per logit, and the
    # sum of the logits cancels, so its tolerance follows the magnitudes summed (softcap maps
    # the masked logits to -softcap, not -inf)
    cols = [i for i in range(want.shape[1]) if i not in (ARGMAX, SUMZ)]
    torch.testing.assert_close(got[:, cols], want[:, cols], rtol=2e-5, atol=2e-5)
    z_abs = (e.float() @ c.float().T).abs().sum(1) + want[:, SUMZ].abs()
    same = got[:, SUMZ] == want[:, SUMZ]  # -inf where the bias masks vocabulary
    assert (same | ((got[:, SUMZ] - want[:, SUMZ]).abs() <= 2e-5 + 4e-7 * z_abs)).all()
    if summary:  # bf16 of fp32 maxima that may differ in the last fp32 bits: 1 bf16 ulp
        torch.testing.assert_close(got_max.float(), want_max.float(), rtol=2**-7, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("split", [1, 2], ids=["split1", "split2"])
def test_target_logit_is_the_tiles_logit_bit_for_bit(case, split, hopper):
    """`vpcce.kernels.target_logit` computes ZTARGET out of the tiles. With every target at its
    token's maximum it equals the MAX column, bit for bit: the same tensor-core chains as the
    tile's, so ``lse - z_target`` cancels their rounding as when the tile picked the target."""
    e, c, y, bias, kw = _case_inputs(case)
    cfg = replace(HOPPER, split_every=split)
    first, _ = _partials(e, c, y, bias, cfg, **kw)
    got, _ = _partials(e, c, argmax_column(first).long(), bias, cfg, **kw)
    assert torch.equal(got[:, ZTARGET], got[:, MAX])


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("sum_z", [False, True], ids=["loss", "label-smoothing"])
def test_loss_columns_without_stats_are_bitwise_the_full_ones(case, sum_z, hopper):
    """Without the entropy / argmax (and the sum of the logits) the epilogue is shorter; what the
    loss reads is unchanged, bit for bit."""
    e, c, y, bias, kw = _case_inputs(case)
    full, _ = _partials(e, c, y, bias, HOPPER, **kw)
    got, _ = _partials(e, c, y, bias, HOPPER, stats=False, sum_z=sum_z, **kw)
    read = [MAX, SUMEXP, ZTARGET] + [SUMZ] * sum_z
    assert torch.equal(got[:, read], full[:, read])


@pytest.mark.cuda
def test_bf16_plain_operands_take_the_hopper_kernel(monkeypatch, hopper):
    calls = []
    monkeypatch.setattr(forward_hopper, "launch", lambda *a, **k: calls.append(a))
    e = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(256, dtype=torch.long, device="cuda")
    forward_partials(make_layout(e, y, 0), c, None, vocab_start=0, logit_scale=1.0, softcap=None)
    assert len(calls) == 1
    # fp32 operands keep the Triton kernel
    forward_partials(
        make_layout(e.float(), y, 0), c.float(), None, vocab_start=0, logit_scale=1.0, softcap=None
    )
    assert len(calls) == 1
