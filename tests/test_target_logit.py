"""`vpcce.kernels.target_logit`: each token's target logit (the Hopper forward's ZTARGET
partial) against fp64, in the interpreter on CPU (compiled, bf16, on a GPU); on Hopper,
`tests/test_forward_hopper.py` checks it bit for bit against the forward tile's logit."""

import pytest
import torch

from vpcce.kernels.common import interpreting
from vpcce.kernels.target_logit import target_logits

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# With a GPU the kernel runs compiled: a CUDA test then, which `pytest -m cuda` selects; without
# one it runs in the interpreter and stays in the CPU suite.
pytestmark = [pytest.mark.cuda] if torch.cuda.is_available() else []


def _want(e2, c, bias, y, vocab_start, logit_scale, softcap):
    """fp64 ``softcap(scale (e . c[y] + bias[y]))`` for targets in the shard, else 0."""
    v = y.reshape(-1) - vocab_start
    owned = (v >= 0) & (v < c.shape[0])
    z = e2.double() @ c.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    picked = z[torch.arange(len(v), device=v.device), v.clamp(0, c.shape[0] - 1)]
    return torch.where(owned, picked, torch.zeros_like(picked)), owned


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bias,softcap,scale", [(False, None, 1.0), (True, 3.0, 0.5)])
def test_target_logits_against_fp64(dtype, bias, softcap, scale):
    """Ragged N and D; a [B, T'] target view with strides; targets in the shard, in another
    shard and ``ignore_index``; written into a strided column, nothing else touched."""
    dtype = DTYPES[dtype]
    if not interpreting() and (dtype == torch.float32 or not torch.cuda.is_available()):
        pytest.skip("compiled, the kernel takes 16-bit CUDA operands (the Hopper forward's)")
    gen = torch.Generator().manual_seed(3)
    b, t, d, v, start = 3, 13, 200, 50, 30
    e2 = torch.randn(b * t, d, generator=gen).to(dtype)
    c = torch.randn(v, d, generator=gen).to(dtype)
    bias_t = torch.randn(v, generator=gen).to(dtype) if bias else None
    y = torch.randint(0, 120, (b, t + 1), generator=gen)[:, 1:]  # a strided [B, T'] view
    y[0, 3], y[1, 0], y[2, 5] = -100, start, start + v - 1
    device = "cpu" if interpreting() else "cuda"
    e2, c, y = e2.to(device), c.to(device), y.to(device)
    bias_t = None if bias_t is None else bias_t.to(device)
    out = torch.full((b * t, 6), float("nan"), device=device)
    target_logits(
        e2, c, bias_t, y, out[:, 4], seq_len=t, vocab_start=start, logit_scale=scale,
        softcap=softcap, block_d=64, split=2,
    )  # fmt: skip
    want, owned = _want(e2, c, bias_t, y, start, scale, softcap)
    assert 0 < owned.sum() < len(owned)
    torch.testing.assert_close(out[:, 4].double(), want, rtol=1e-5, atol=1e-5)
    assert (out[~owned, 4] == 0).all()
    assert torch.isnan(out[:, [0, 1, 2, 3, 5]]).all()  # only the one column is written
