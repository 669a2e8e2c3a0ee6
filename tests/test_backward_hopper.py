"""The warp-specialized Hopper dlogits kernel (`vpcce.kernels.backward_hopper`) vs the Triton one.

On an H100 the exact bf16 backward without a bias takes the Hopper kernel for its ``dz`` chunks;
these cases compare its gradients with the Triton kernel's (``HOPPER_BACKWARD_BLOCKS = None``),
the forward being the same, on ragged sizes, several chunks (the last one partial), the LSE
output's gradient, label smoothing, softcap and scale, a shifted single sequence, and more
(token block, tile) items than SMs.
"""

import pytest
import torch

from vpcce import linear_cross_entropy
from vpcce.kernels import backward_hopper, common

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("hopper")]


def _grads(e, c, y, hopper, **kw):
    saved = common.HOPPER_BACKWARD_BLOCKS
    common.HOPPER_BACKWARD_BLOCKS = hopper
    try:
        leaves = [t.detach().requires_grad_() for t in (e, c)]
        out = linear_cross_entropy(*leaves, y, impl="triton", filter_eps=None, **kw)
        if kw.get("return_lse"):
            loss, lse = out
            total = loss.sum() + 0.1 * lse.sum()  # a stride-0 LSE gradient, as lse.sum() gives
        else:
            total = out.sum()
        return torch.autograd.grad(total, leaves)
    finally:
        common.HOPPER_BACKWARD_BLOCKS = saved


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = {
    "plain": dict(n=1000, d=256, v=4096, kw={}),
    "ragged-chunks": dict(n=300, d=200, v=5017, kw={"chunk_bytes": 300 * 1024 * 2}),
    "lse-smoothing": dict(n=640, d=128, v=3000, kw={"return_lse": True, "label_smoothing": 0.1}),
    "softcap-scale": dict(n=257, d=320, v=2000, kw={"softcap": 15.0, "logit_scale": 0.5}),
    "shift": dict(n=513, d=192, v=2500, kw={"shift": 1, "reduction": "sum"}),
    # 17 token blocks x 20 tiles: more items than SMs, so each persistent program takes several,
    # and the last group of token blocks is partial
    "many-items": dict(n=2100, d=192, v=5017, kw={}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_triton_dlogits(case, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = case["n"], case["d"], case["v"]
    e = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
    c = (torch.randn(v, d, device="cuda", generator=g) * 0.3).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::7] = -100
    calls = []
    launcher = backward_hopper.launcher
    monkeypatch.setattr(
        backward_hopper, "launcher", lambda *a, **k: calls.append(1) or launcher(*a, **k)
    )
    got = _grads(e, c, y, common.HOPPER_BACKWARD_BLOCKS, **case["kw"])
    assert calls  # the Hopper kernel ran
    want = _grads(e, c, y, None, **case["kw"])
    # both round dz to bf16 from logits that differ in the last fp32 bits (exp2 vs exp): a dz
    # element may land one bf16 ulp apart
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 2e-3


def test_bias_and_filtering_keep_the_triton_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(backward_hopper, "launcher", lambda *a, **k: calls.append(1))
    e = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.zeros(256, dtype=torch.long, device="cuda")
    linear_cross_entropy(e, c, y, bias, impl="triton").backward()
    linear_cross_entropy(e, c, y, impl="triton", filter_eps=1e-4).backward()
    assert not calls


def test_target_columns_hold_the_forwards_value(monkeypatch):
    """Each target's column of the Hopper kernel's dz is `target_dz`'s 16-bit value, bit for bit
    (not the kernel's own one-chain logit): several chunks, softcap, smoothing, ignored tokens."""
    from test_target_dz import _captured_chunks

    g = torch.Generator(device="cuda").manual_seed(1)
    n, d, v = 700, 256, 3000
    c = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    e = (4.0 * c.float()[y] + 0.3 * torch.randn(n, d, device="cuda", generator=g)).bfloat16()
    y[::9] = -100
    calls = []
    launcher = backward_hopper.launcher
    monkeypatch.setattr(
        backward_hopper, "launcher", lambda *a, **k: calls.append(1) or launcher(*a, **k)
    )
    got = _captured_chunks(monkeypatch)
    opts = dict(softcap=20.0, label_smoothing=0.05, chunk_bytes=n * 1024 * 2)
    _grads(e, c, y, common.HOPPER_BACKWARD_BLOCKS, **opts)
    assert calls and len(got["chunks"]) > 1
    ((hi, owned),) = got["hi"]
    assert owned.sum() == n - len(range(0, n, 9))
    seen = torch.zeros_like(owned)
    for dz, v0 in got["chunks"]:
        here = owned & (y >= v0) & (y < v0 + dz.shape[1])
        tokens = here.nonzero()[:, 0]
        assert torch.equal(dz[tokens, y[tokens] - v0], hi[tokens])
        seen |= here
    assert torch.equal(seen, owned)
