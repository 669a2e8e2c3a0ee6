"""CUDA-only checks of the Triton kernels (skipped without a GPU; run on the H100).

The large-shape acceptance (fp64 truth at N 8192 x D 2304 x V 256000, memory, timings) is
`python -m vpcce.launch.kernel_check`; these are the quick same-device properties.
"""

import pytest
import torch

from vpcce import linear_cross_entropy
from vpcce.kernels import common
from vpcce.launch.data import lm_like

pytestmark = pytest.mark.cuda


def _grads(impl, e, c, y, bias=None, **kw):
    leaves = [t.detach().requires_grad_() for t in (e, c) + ((bias,) if bias is not None else ())]
    loss = linear_cross_entropy(leaves[0], leaves[1], y, *leaves[2:], impl=impl, **kw)
    return (loss.detach(), *torch.autograd.grad(loss.sum(), leaves))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"shift": 1, "label_smoothing": 0.1},
        {"softcap": 15.0, "logit_scale": 0.5},
        {"reduction": "none"},
        {"chunk_bytes": 1 << 16},
        {"accum_e_fp32": True},
        {"filter_eps": 1e-7},
    ],
    ids=["plain", "shift-ls", "softcap-scale", "none", "chunks", "accum-e", "filter"],
)
def test_triton_matches_reference(dtype, kw):
    torch.manual_seed(0)
    b = lm_like(2 * 300, 320, 5003, entropy=4.0, dtype=dtype, device="cuda")
    e, c, y = b.e.view(2, 300, 320), b.c, b.targets.view(2, 300)
    y[0, :17] = -100
    bias = (0.1 * torch.randn(c.shape[0], device="cuda")).to(dtype)
    ref = _grads("torch", e, c, y, bias, **kw)
    out = _grads("triton", e, c, y, bias, **kw)
    # tf32 / bf16 dz
    loss_tol, grad_tol = (2e-6, 2e-3) if dtype == torch.float32 else (1e-5, 1.5e-2)
    assert _rel(out[0], ref[0]) < loss_tol
    for got, want in zip(out[1:], ref[1:], strict=True):
        assert got.dtype == dtype
        assert _rel(got, want) < grad_tol


@pytest.mark.parametrize("filter_eps", ["auto", None])
def test_bitwise_deterministic_and_no_host_sync(filter_eps):
    """The exact backward never waits for the GPU; the default reads whether the softmax tail is
    worth skipping (`vpcce.kernels.tail`), and is deterministic either way."""
    b = lm_like(1000, 256, 9000, entropy=3.0, device="cuda")
    first = _grads("triton", b.e, b.c, b.targets, filter_eps=filter_eps)
    torch.cuda.set_sync_debug_mode("error" if filter_eps is None else "default")
    try:
        second = _grads("triton", b.e, b.c, b.targets, filter_eps=filter_eps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)


def test_strided_classifier_is_not_copied():
    b = lm_like(512, 128, 4000, entropy=3.0, device="cuda")
    wide = torch.zeros(4000, 256, dtype=b.c.dtype, device="cuda")
    wide[:, ::2] = b.c
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    got = _grads("triton", b.e, strided, b.targets)[0]
    # TMA cannot read the strided rows: the Triton forward runs, and gives what it gives on the
    # contiguous copy, bit for bit; on Hopper the contiguous copy takes the warp-specialized
    # forward, whose longer accumulation chains round differently in the last bits
    torch.testing.assert_close(got, _grads("triton", b.e, b.c, b.targets)[0], rtol=1e-6, atol=0)
    saved, common.HOPPER_FORWARD_BLOCKS = common.HOPPER_FORWARD_BLOCKS, None
    try:
        want = _grads("triton", b.e, b.c, b.targets)[0]
    finally:
        common.HOPPER_FORWARD_BLOCKS = saved
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("extra", [[], ["--forward-only", "--filter-eps", "0.001"]])
def test_profile_step_runs(extra, capsys):
    from vpcce.launch import profile_step

    profile_step.main(["--n", "300", "--d", "64", "--v", "5000", "--steps", "2", *extra])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 1"], lines


def test_expanded_lse_gradient():
    """``lse.sum()`` hands the backward a stride-0 gradient (see test_kernels)."""
    b = lm_like(300, 64, 5000, entropy=3.0, device="cuda")
    grads = {}
    for impl in ("torch", "triton"):
        leaves = [t.detach().float().requires_grad_() for t in (b.e, b.c)]
        loss, lse = linear_cross_entropy(*leaves, b.targets, impl=impl, return_lse=True)
        (loss + lse.sum()).backward()
        grads[impl] = [x.grad for x in leaves]
    for got, want in zip(grads["triton"], grads["torch"], strict=True):
        assert _rel(got, want) < 2e-3  # tf32 dots
