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
from graphs import capture

from vpcce import linear_cross_entropy
from vpcce.kernels import matmul, matmul_hopper
from vpcce.kernels.matmul import ADD, STORE, grad_matmul
from vpcce.launch.data import lm_like

# the module (the package exports the function `backward` under the same name)
bwd = importlib.import_module("vpcce.kernels.backward")

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("hopper")]


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

    def multiply(into):
        grad_matmul(
            a, other.unsqueeze(0), into.unsqueeze(0), mode=mode, blocks=(128, 128, 64),
            upcast=False, precision="tf32", skip=skip_ab, skip_tile=skip_tile,
        )  # fmt: skip

    multiply(out)
    assert len(calls) == 1, "the Hopper kernel did not take the call"
    err = ((out.double() - want).norm() / want.norm()).item()
    assert err < (1e-6 if mode == ADD else 4e-3), err  # bf16 output: its rounding
    again = start.clone()
    multiply(again)
    assert torch.equal(out, again)


@pytest.mark.parametrize("tokens, split", [(512, 256), (300, 128), (384, 384)])
def test_one_launch_adds_into_two_outputs(tokens, split, monkeypatch):
    """dE's two-part scratch (`grad_e`): rows before ``split`` into one fp32 matrix, the rest
    into another, in one launch; each part as the kept product says, bitwise reproducible."""
    calls = _spy(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(1)
    chunk, d = 768, 384
    dz = (torch.randn(tokens, chunk, device="cuda", generator=g) * 0.01).to(torch.bfloat16)
    c = torch.randn(chunk, d, device="cuda", generator=g).to(torch.bfloat16)
    skip = torch.rand((-(-tokens // 128), chunk // 256), device="cuda", generator=g) < 0.5
    skip = skip.to(torch.int8)
    first = torch.randn(split, d, device="cuda", generator=g)
    rest = torch.randn(tokens - split, d, device="cuda", generator=g)
    kept = dz.double().masked_fill(_dropped_entries(skip, tokens, chunk, (128, 256)), 0.0)
    want = kept @ c.double() + torch.cat([first, rest]).double()

    opts = dict(mode=ADD, blocks=(128, 128, 64), upcast=False, precision="tf32")

    def multiply(a_out, b_out):
        grad_matmul(
            dz, c.unsqueeze(0), a_out.unsqueeze(0), skip=skip, skip_tile=(128, 256),
            rest=(split, b_out.unsqueeze(0)), **opts,
        )  # fmt: skip

    starts = first.clone(), rest.clone()
    multiply(first, rest)
    assert len(calls) == 1, "not one launch of the Hopper kernel"
    got = torch.cat([first, rest]).double()
    # the chains' truncation (module docstring): ~1e-6 here, the two-launch check below is exact
    assert ((got - want).norm() / want.norm()).item() < 4e-6
    again = [x.clone() for x in starts]
    multiply(*again)
    assert torch.equal(first, again[0]) and torch.equal(rest, again[1])
    # one launch per part: the same programs, bitwise the same sums
    parts = [x.clone() for x in starts]
    for rows, out, flags in (
        (slice(0, split), parts[0], skip),
        (slice(split, None), parts[1], skip[split // 128 :]),
    ):
        grad_matmul(
            dz[rows], c.unsqueeze(0), out.unsqueeze(0), skip=flags, skip_tile=(128, 256), **opts
        )
    assert torch.equal(first, parts[0]) and torch.equal(rest, parts[1])


def test_declines_what_it_cannot_address():
    a = torch.zeros(256, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.zeros(512, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(256, 256, device="cuda")
    assert matmul_hopper.supported(a, b, out, (128, 256))
    assert not matmul_hopper.supported(a, b, out, (64, 256)), "row blocks straddle skip tiles"
    assert not matmul_hopper.supported(a.float(), b.float(), out, (128, 256)), "fp32 operands"
    huge = torch.empty_strided((2, 2**30), (2**30 + 64, 1), device="meta")
    assert not matmul_hopper.takes(b, huge, b.dtype, (128, 256)), "offsets past int32"
    assert not matmul_hopper.supported(a, b, out.t(), (128, 256)), "strided output columns"
    assert not matmul_hopper.supported(a[:, 1:], b[1:], out, (128, 256)), "unaligned rows"
    assert matmul._hopper_sparse(a, b[None], out[None], STORE, None, (128, 256)) is None


def test_fast_mode_gradients_match_the_triton_gemm(monkeypatch):
    """The 2^-12 filter end to end (planned, every chunk sparse on Hopper: both gradients' GEMMs
    run it) against the round-10 dispatch (Triton GEMM on nearly empty chunks, cuBLAS over zeros
    elsewhere): the same dropped tiles, so the gradients differ by summation order only."""
    batch = lm_like(2048, 256, 16384, entropy=5.0, device="cuda")

    def grads():
        leaves = [t.detach().requires_grad_() for t in (batch.e, batch.c)]
        loss = linear_cross_entropy(*leaves, batch.targets, filter_eps=2.0**-12)
        return (loss, *torch.autograd.grad(loss, leaves))

    calls = _spy(monkeypatch)
    with monkeypatch.context() as m:  # every chunk sparse: the plan's density is never read
        m.setattr(bwd, "_may_sync", lambda device: pytest.fail("the plan was read on the host"))
        got = grads()
    assert {call["add"] for call in calls} == {True, False}, "dE and dC take the Hopper kernel"
    monkeypatch.setattr(bwd, "HOPPER_SPARSE_E_MAX", bwd.SPARSE_E_MAX)
    monkeypatch.setattr(bwd, "HOPPER_SPARSE_C_MAX", bwd.SPARSE_C_MAX)
    monkeypatch.setattr(matmul, "_hopper_sparse", lambda *args: None)
    want = grads()
    assert torch.equal(got[0], want[0])  # the loss is the forward's
    for x, w in zip(got[1:], want[1:], strict=True):  # bf16 gradients: an ulp here and there
        err = ((x.double() - w.double()).norm() / w.double().norm()).item()
        assert err < 2e-3, err


def test_fast_mode_captures_in_a_cuda_graph(monkeypatch):
    """The planned fast mode reads nothing on the host on Hopper, so a training step captures
    (sync debug mode "error") and replays bitwise equal to eager, on new inputs too."""
    calls = _spy(monkeypatch)
    batches = [lm_like(1024, 256, 8192, entropy=5.0, device="cuda", seed=s) for s in (0, 1)]
    static = [t.detach().clone().requires_grad_() for t in (batches[0].e, batches[0].c)]
    static_y = batches[0].targets.clone()

    def step(e, c, y):
        return linear_cross_entropy(e, c, y, filter_eps=2.0**-12)

    def train_step():
        for x in static:
            x.grad = None
        loss = step(*static, static_y)
        loss.backward()
        return loss

    graph, graph_loss = capture(train_step, warmup=2)
    assert calls, "the Hopper kernel did not run"
    for batch in batches:
        for s, x in zip(static, (batch.e, batch.c), strict=True):
            s.data.copy_(x)
        static_y.copy_(batch.targets)
        graph.replay()
        leaves = [t.detach().requires_grad_() for t in (batch.e, batch.c)]
        loss = step(*leaves, batch.targets)
        grads = torch.autograd.grad(loss, leaves)
        torch.cuda.synchronize()
        assert torch.equal(graph_loss, loss)
        for s, g in zip(static, grads, strict=True):
            assert torch.equal(s.grad, g)
