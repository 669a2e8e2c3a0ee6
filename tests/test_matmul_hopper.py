"""The warp-specialized tile-skipping gradient GEMM (`vpcce.kernels.matmul_hopper`).

On an H100 `grad_matmul` hands every skip-masked `STORE` / `ADD` call on plain 16-bit matrices to
it; these cases compare it with an fp64 product over the kept K blocks only, for both of the
backward's shapes (dE: ``dz @ C`` into fp32; dC: ``dz^T @ E`` into bf16), ragged sizes, row blocks
with nothing kept, and check that it ran and that it is bitwise reproducible. The end-to-end
filtered backward runs it in `test_cuda.py`'s filter cases.
"""

import importlib

import pytest
import torch

from vpcce import linear_cross_entropy
from vpcce.kernels import forward_hopper, matmul, matmul_hopper
from vpcce.kernels.matmul import ADD, STORE, grad_matmul
from vpcce.launch.data import lm_like

# the module (the package exports the function `backward` under the same name)
bwd = importlib.import_module("vpcce.kernels.backward")

pytestmark = pytest.mark.cuda


def _hopper_or_skip():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    if not forward_hopper.gluon_validated():
        pytest.skip("the Gluon kernels are off on this Triton")


def _dropped_entries(skip, m, k, skip_tile):
    """The ``[m, k]`` mask of the entries whose skip tile is flagged."""
    rows = torch.arange(m, device=skip.device) // skip_tile[0]
    cols = torch.arange(k, device=skip.device) // skip_tile[1]
    return skip[rows][:, cols] != 0


def _spy(monkeypatch):
    calls = []
    launch = matmul_hopper.launch

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return launch(*args, **kwargs)

    monkeypatch.setattr(matmul_hopper, "launch", spy)
    return calls


# (rows of dz = tokens, columns of dz = vocabulary chunk, D)
SHAPES = {"even": (512, 1024, 512), "ragged": (300, 1000, 200), "one-tile": (128, 256, 256)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("grad", ["dE", "dC"])
def test_matches_the_kept_product(shape, grad, monkeypatch):
    _hopper_or_skip()
    calls = _spy(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, chunk, d = shape
    dz = (torch.randn(tokens, chunk, device="cuda", generator=g) * 0.01).to(torch.bfloat16)
    tiles = (-(-tokens // 128), -(-chunk // 256))
    skip = (torch.rand(tiles, device="cuda", generator=g) < 0.6).to(torch.int8)
    if min(tiles) > 1:
        skip[0] = 1  # a token block with nothing kept (dE: output rows left as they are)
        skip[:, 0] = 1  # a vocabulary tile with nothing kept (dC: output rows of zeros)
    skip[-1, -1] = 0
    if grad == "dE":  # dE (+)= dz @ C[chunk], fp32 accumulator, skip tiles (128 tokens, 256 vocab)
        other = torch.randn(chunk, d, device="cuda", generator=g).to(torch.bfloat16)
        a, skip_ab, skip_tile = dz, skip, (128, 256)
        out = torch.randn(tokens, d, device="cuda", generator=g)
        mode = ADD
    else:  # dC = dz^T @ E, bf16, skip tiles (256 vocab, 128 tokens)
        other = torch.randn(tokens, d, device="cuda", generator=g).to(torch.bfloat16)
        a, skip_ab, skip_tile = dz.t(), skip.t(), (256, 128)
        out = torch.full((chunk, d), float("nan"), device="cuda", dtype=torch.bfloat16)
        mode = STORE
    start = out.clone()
    kept_a = a.double().masked_fill(_dropped_entries(skip_ab, *a.shape, skip_tile), 0.0)
    want = kept_a @ other.double() + (start.double() if mode == ADD else 0.0)

    grad_matmul(
        a, other.unsqueeze(0), out.unsqueeze(0), mode=mode, blocks=(128, 128, 64), upcast=False,
        precision="tf32", skip=skip_ab, skip_tile=skip_tile,
    )  # fmt: skip
    assert len(calls) == 1, "the Hopper kernel did not take the call"
    err = ((out.double() - want).norm() / want.norm()).item()
    assert err < (1e-6 if mode == ADD else 4e-3), err  # bf16 output: its rounding
    again = start.clone()
    grad_matmul(
        a, other.unsqueeze(0), again.unsqueeze(0), mode=mode, blocks=(128, 128, 64),
        upcast=False, precision="tf32", skip=skip_ab, skip_tile=skip_tile,
    )  # fmt: skip
    assert torch.equal(out, again)


def test_declines_what_it_cannot_address():
    _hopper_or_skip()
    a = torch.zeros(256, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.zeros(512, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(256, 256, device="cuda")
    assert matmul_hopper.supported(a, b, out, (128, 256))
    assert not matmul_hopper.supported(a, b, out, (64, 256)), "row blocks straddle skip tiles"
    assert not matmul_hopper.supported(a.float(), b, out, (128, 256)), "fp32 operands"
    assert not matmul_hopper.supported(a, b, out.t(), (128, 256)), "strided output columns"
    assert not matmul_hopper.supported(a[:, 1:], b[1:], out, (128, 256)), "unaligned rows"
    assert matmul._hopper_sparse(a, b[None], out[None], STORE, None, (128, 256)) is None


def test_fast_mode_gradients_match_the_triton_gemm(monkeypatch):
    """The 2^-12 filter end to end (planned, every chunk sparse on Hopper) against the round-10
    dispatch (Triton GEMM on nearly empty chunks, cuBLAS over zeros elsewhere): the same dropped
    tiles, so the gradients differ by summation order only."""
    _hopper_or_skip()
    batch = lm_like(2048, 256, 16384, entropy=5.0, device="cuda")

    def grads():
        leaves = [t.detach().requires_grad_() for t in (batch.e, batch.c)]
        loss = linear_cross_entropy(*leaves, batch.targets, filter_eps=2.0**-12)
        return (loss, *torch.autograd.grad(loss, leaves))

    calls = _spy(monkeypatch)
    got = grads()
    assert calls, "the Hopper kernel did not run"
    monkeypatch.setattr(bwd, "HOPPER_SPARSE_E_MAX", bwd.SPARSE_E_MAX)
    monkeypatch.setattr(bwd, "HOPPER_SPARSE_C_MAX", bwd.SPARSE_C_MAX)
    monkeypatch.setattr(matmul, "_hopper_sparse", lambda *args: None)
    want = grads()
    assert torch.equal(got[0], want[0])  # the loss is the forward's
    for x, w in zip(got[1:], want[1:], strict=True):
        err = ((x.double() - w.double()).norm() / w.double().norm()).item()
        assert err < 1e-2, err
