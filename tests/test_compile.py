"""torch.compile and CUDA graphs: `linear_cross_entropy` as the ``vpcce::`` custom ops.

- dynamo traces a function that calls `linear_cross_entropy` (every option that changes the op's
  arguments or outputs) into one graph: zero graph breaks;
- compiled (``aot_eager``: the ops' fake implementations and registered autograd; ``inductor``
  once) loss, LSE, statistics and gradients equal the eager call's, dynamic shapes included;
- `torch.library.opcheck` validates both ops' schemas, fake implementations and autograd;
- argument errors are raised at trace time by the fake implementation;
- CUDA (skipped without a GPU): a training step captured in a ``torch.cuda.CUDAGraph`` replays
  with the eager loss and gradients, also after new inputs are copied into its static tensors;
  ``torch.compile`` with Inductor matches eager on the GPU.

The Triton cases run the kernels in the interpreter on the CPU (tests/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from graphs import capture

from vpcce import linear_cross_entropy

V, D, B, T = 203, 24, 2, 9
IMPLS = ["torch", "triton"]
# every option that changes the op's arguments or outputs
OPTIONS = dict(
    shift=1,
    softcap=3.0,
    label_smoothing=0.1,
    logit_scale=0.9,
    return_lse=True,
    return_stats=True,
)


def needs_triton(impl: str):
    """The CPU cases of impl="triton" run the kernels in the interpreter."""
    if impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("impl='triton' on CPU tensors needs TRITON_INTERPRET=1")


def inputs(device="cpu", t=T, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, t, D, generator=g).to(device, dtype).requires_grad_()
    c = (0.5 * torch.randn(V, D, generator=g)).to(device, dtype).requires_grad_()
    bias = (0.2 * torch.randn(V, generator=g)).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (B, t), generator=g)
    targets[0, ::3] = -100
    return e, c, bias, targets.to(device)


def step(e, c, bias, targets, impl, reduction="mean", **options):
    """A training objective: the loss plus a z-loss on the LSE; the statistics ride along."""
    options = {**OPTIONS, **options}
    loss, lse, stats = linear_cross_entropy(
        e, c, targets, bias, impl=impl, reduction=reduction, **options
    )
    objective = loss.sum() + 1e-2 * (lse**2).mean()
    return objective, loss, lse, stats.entropy, stats.argmax, stats.correct


def run(fn, e, c, bias, targets, impl, **kw):
    for x in (e, c, bias):
        x.grad = None
    out = fn(e, c, bias, targets, impl, **kw)
    out[0].backward()
    return [x.detach() for x in out], [x.grad for x in (e, c, bias)]


def assert_same(got, want, exact: bool):
    for g, w in zip(got, want, strict=True):
        if exact:
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_graph_breaks(impl):
    needs_triton(impl)
    e, c, bias, targets = inputs()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(e, c, bias, targets, impl)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.vpcce.linear_cross_entropy.default in ops


@pytest.mark.parametrize(
    "impl,reduction,backend",
    [
        ("torch", "mean", "aot_eager"),
        ("torch", "sum", "aot_eager"),
        ("torch", "none", "aot_eager"),
        ("triton", "mean", "aot_eager"),
        ("triton", "none", "aot_eager"),
        ("torch", "mean", "inductor"),
    ],
)
def test_compiled_matches_eager(impl, reduction, backend):
    needs_triton(impl)
    e, c, bias, targets = inputs()
    eager_out, eager_grads = run(step, e, c, bias, targets, impl, reduction=reduction)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    out, grads = run(compiled, e, c, bias, targets, impl, reduction=reduction)
    # aot_eager runs the same op bodies: bitwise; inductor fuses the surrounding objective
    assert_same(out, eager_out, exact=backend == "aot_eager")
    assert_same(grads, eager_grads, exact=backend == "aot_eager")


def test_compiled_dynamic_shapes_and_partial_grads():
    """Symbolic sequence lengths through the fake implementation; no bias, e frozen."""
    torch._dynamo.reset()

    def fn(e, c, bias, targets, impl):
        return (linear_cross_entropy(e, c, targets, shift=1, impl=impl),)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for t in (T, T + 4):
        e, c, _, targets = inputs(t=t, seed=t)
        e.requires_grad_(False)
        want = fn(e, c, None, targets, "torch")[0]
        want.backward()
        want_grad, c.grad = c.grad, None
        got = compiled(e, c, None, targets, "torch")[0]
        got.backward()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(c.grad, want_grad, rtol=0, atol=0)
        assert e.grad is None


# the Triton kernels with a tile filter: the tile-bounds output is not empty and the fake's shape
# must match it; opcheck's AOT comparison sums every output, so the backward receives stride-0
# gradients (it once read them as dense vectors)
@pytest.mark.parametrize(
    "impl, filter_eps, stats_used", [("torch", None, True), ("triton", 0.02, False)]
)
def test_opcheck(impl, filter_eps, stats_used):
    """Schema, fake implementation, registered autograd and AOT dispatch of both ops."""
    needs_triton(impl)
    e, c, bias, targets = inputs()
    fwd = torch.ops.vpcce.linear_cross_entropy.default
    bwd = torch.ops.vpcce.linear_cross_entropy_backward.default
    #       impl, filter_eps, filter_e/c_grad, accum_e/c_fp32, shift, ignore_index, reduction,
    #       label_smoothing, logit_scale, softcap, chunk_bytes, vp start/stop/group,
    #       reduce_e_grad, sequence_parallel, reduce_dtype
    options = (
        impl,
        filter_eps,
        True,
        True,
        False,
        False,
        1,
        -100,
        "none",
        0.1,
        0.9,
        3.0,
        None,
        -1,
        -1,
        None,
        True,
        False,
        torch.float32,
    )
    for b in (bias, None):
        # then validate, stats_used, lse_used
        torch.library.opcheck(fwd, (e, c, targets, b, *options, True, stats_used, True))
        with torch.no_grad():  # the backward op has no backward (no double backward)
            out = fwd(e, c, targets, b, *options, True, stats_used, True)
        _, lse, _, argmax, z_target, valid, count, bounds = out
        assert ((argmax >= 0) if stats_used else (argmax == -1)).all()  # computed when asked
        assert (bounds.numel() > 0) == (impl == "triton" and b is None)
        grad_loss = torch.rand(B, T - 1)
        args = (
            e.detach(),
            c.detach(),
            targets,
            None if b is None else b.detach(),
            lse,
            z_target,
            valid,
            count,
            bounds,
            grad_loss,
            torch.rand(B, T - 1),
            True,
            True,
            b is not None,
            *options,
            stats_used,
        )
        torch.library.opcheck(bwd, args)


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_loss_only_matches_eager(impl, monkeypatch):
    """Without ``return_stats`` the forward skips the entropy / argmax partials; compiled, the
    backward op rebuilds the forward's configuration (the same option fingerprint, so a
    vocab-parallel layout check is not repeated)."""
    needs_triton(impl)
    import vpcce.ops as ops

    seen = []
    config = ops._config
    monkeypatch.setattr(ops, "_config", lambda *a, **k: seen.append(k["stats"]) or config(*a, **k))

    def loss_only(e, c, bias, targets, impl):
        opts = dict(shift=1, label_smoothing=0.1, logit_scale=0.9)
        return (linear_cross_entropy(e, c, targets, bias, impl=impl, **opts),)

    e, c, bias, targets = inputs()
    want, want_grads = run(loss_only, e, c, bias, targets, impl)
    torch._dynamo.reset()
    got, grads = run(torch.compile(loss_only, fullgraph=True, backend="aot_eager"), e, c, bias,
                     targets, impl)  # fmt: skip
    assert_same(got, want, exact=True)
    assert_same(grads, want_grads, exact=True)
    assert seen and not any(seen), seen  # forward and backward ops: stats off


def test_argument_errors_at_trace_time():
    e, c, bias, targets = inputs()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"targets must have shape \(2, 9\)"):
        compiled(e, c, bias, targets[:, :-1], "torch")
    with pytest.raises(Exception, match="does not match e dtype"):
        compiled(e, c.double(), bias, targets, "torch")


@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_stays_outside(compiled):
    """As for F.cross_entropy, autocast leaves the loss in the inputs' dtypes (fp32 here)."""
    e, c, bias, targets = inputs()
    want_out, want_grads = run(step, e, c, bias, targets, "torch")
    fn = step
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run(fn, e, c, bias, targets, "torch")
    assert_same(out, want_out, exact=True)
    assert_same(grads, want_grads, exact=True)


def test_eager_calls_do_not_use_the_op():
    e, c, bias, targets = inputs()
    loss = linear_cross_entropy(e, c, targets, bias, impl="torch")
    assert type(loss.grad_fn).__name__ == "_LinearCrossEntropyBackward"


# ---- CUDA: graph capture of a training step, Inductor ----


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_replays_eager(dtype):
    e, c, bias, targets = inputs("cuda", t=257, dtype=dtype)
    static = [x.detach().clone().requires_grad_(x.requires_grad) for x in (e, c, bias)]
    static_targets = targets.clone()

    def train_step():
        for x in static:
            x.grad = None
        objective, loss, lse, *_ = step(*static, static_targets, "triton")
        objective.backward()
        return loss, lse

    graph, (graph_loss, graph_lse) = capture(train_step)
    for seed in (0, 1):  # replay on the captured inputs, then on new ones copied in
        fresh = inputs("cuda", t=257, seed=seed, dtype=dtype)
        for s, x in zip(static, fresh[:3], strict=True):
            s.data.copy_(x)
        static_targets.copy_(fresh[3])
        graph.replay()
        torch.cuda.synchronize()
        eager_out, eager_grads = run(step, *fresh, "triton")
        torch.testing.assert_close(graph_loss, eager_out[1], rtol=0, atol=0)
        torch.testing.assert_close(graph_lse, eager_out[2], rtol=0, atol=0)
        for s, want in zip(static, eager_grads, strict=True):
            torch.testing.assert_close(s.grad, want, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_compiled_matches_eager():
    e, c, bias, targets = inputs("cuda", t=257)
    eager_out, eager_grads = run(step, e, c, bias, targets, "triton")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    out, grads = run(compiled, e, c, bias, targets, "triton")
    assert_same(out, eager_out, exact=False)
    assert_same(grads, eager_grads, exact=False)
