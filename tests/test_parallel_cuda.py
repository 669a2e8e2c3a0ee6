"""Vocab parallelism on CUDA tensors with the Triton kernels: 2 gloo ranks sharing one GPU.

NCCL refuses two ranks on one GPU, so the ranks use gloo. Where gloo has no CUDA implementation
of a collective, this test (and only this test) stages it through host memory.
"""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

from vpcce import VocabParallelOptions, linear_cross_entropy
from vpcce.parallel import collectives

pytestmark = pytest.mark.cuda

N_SEQ, T, D, V = 2, 300, 256, 30011  # V odd: uneven shards


def _data(dtype):
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(N_SEQ, T, D, generator=gen)
    c = torch.randn(V, D, generator=gen) * (4.0 / D**0.5)  # peaked enough to matter
    y = torch.randint(0, V, (N_SEQ, T), generator=gen)
    y[0, :11] = -100
    bias = 0.1 * torch.randn(V, generator=gen)
    floats = [t.to(dtype).cuda() if t.is_floating_point() else t.cuda() for t in (e, c, bias)]
    return floats + [y.cuda()]


def _stage_through_host():
    """Test-only: run gloo collectives on host copies of CUDA tensors."""

    def staged(fn):
        def run(out, inp, *args, **kwargs):
            host = out.cpu()
            fn(host, inp.cpu(), *args, **kwargs)
            out.copy_(host)

        return run

    collectives._all_gather = staged(collectives._all_gather)
    collectives._reduce_scatter = staged(collectives._reduce_scatter)
    all_reduce = dist.all_reduce

    def all_reduce_host(tensor, *args, **kwargs):
        host = tensor.cpu()
        all_reduce(host, *args, **kwargs)
        tensor.copy_(host)

    dist.all_reduce = all_reduce_host


def _gloo_has_cuda_all_gather() -> bool:
    try:
        out = torch.empty(2 * dist.get_world_size(), device="cuda")
        collectives._all_gather(out, torch.ones(2, device="cuda"))
        return True
    except (RuntimeError, ValueError):
        return False


def _grads(e, c, bias, y, opts, **kw):
    leaves = [t.detach().requires_grad_() for t in (e, c, bias)]
    loss = linear_cross_entropy(
        *leaves[:2], y, leaves[2], impl="triton", vocab_parallel_options=opts, shift=1,
        label_smoothing=0.05, **kw,
    )  # fmt: skip
    return [loss.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(loss, leaves)]


def _rank(rank, world, dtype):
    native = _gloo_has_cuda_all_gather()
    if not native:
        _stage_through_host()
    e, c, bias, y = _data(dtype)
    results = {"native_gloo_cuda": native}
    for sp in (False, True):
        opts = VocabParallelOptions.from_vocab(V, sequence_parallel=sp)
        shard = slice(opts.start, opts.stop)
        e_in = e.chunk(world)[rank] if sp else e
        results[sp] = (opts.start, opts.stop, _grads(e_in, c[shard], bias[shard], y, opts))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_ranks_on_one_gpu_match_single_gpu(dtype):
    ranks = run_ranks(_rank, 2, dtype, timeout=600)
    e, c, bias, y = _data(dtype)
    loss, de, dc, db = _grads(e, c, bias, y, None)
    tol = 2e-5 if dtype == torch.float32 else 1.5e-2
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    for sp in (False, True):
        losses = [r[sp][2][0] for r in ranks]
        assert all(torch.equal(losses[0], x) for x in losses)  # bitwise equal on every rank
        assert rel(losses[0], loss) < 1e-6
        for rank, r in enumerate(ranks):
            start, stop, (_, de_r, dc_r, db_r) = r[sp]
            want_de = de.chunk(2)[rank] if sp else de
            assert rel(de_r, want_de) < tol
            assert rel(dc_r, dc[start:stop]) < tol
            assert rel(db_r, db[start:stop]) < tol
    print("gloo CUDA all-gather native:", ranks[0]["native_gloo_cuda"])
