"""Cluster check: vocab-parallel loss and gradients against a single-rank computation, per rank.

    torchrun --standalone --nproc_per_node W -m vpcce.launch.check [--backend nccl|gloo]
        [--impl auto|torch|triton] [--dtype fp32|bf16|fp16|fp64] [--seq-len T] [--hidden D]
        [--vocab V] [--seed S] [--inject-error RANK] [-v]

Every rank builds the same global inputs from ``--seed`` (hidden states ``[2W, T, D]``, a
classifier ``[V, D]`` whose default V = 1031 is prime, so the shards of
`VocabParallelOptions.from_vocab` are uneven for any W > 1; targets on both sides of every shard
boundary) and, for each case of `CASES` (sequence parallelism off and on; plain, and with bias,
softcap, label smoothing, ignored tokens, shift, per-token loss and a z-loss-style LSE term), runs
`linear_cross_entropy` vocab-parallel over the group. It compares what it owns with the same
function computed on one rank over the full inputs, locally: the loss (and LSE), the hidden-state
gradient (its token slice under sequence parallelism), its classifier and bias gradient rows.

- reference: ``impl="torch"`` on the fp64 upcast of the same (rounded) inputs, no parallelism;
- error: ``max |x - ref| / max |ref|``;
- tolerance: ``4 x`` the error of the single-rank, non-parallel call with the same ``--impl`` and
  dtype, clipped to ``[TOL[dtype], CAP[dtype]]``: vocab parallelism may not be less accurate than
  one rank (TF32 or 16-bit rounding of one rank's result sets the scale, not a fixed guess), and
  a broken single-rank result cannot widen the bar past CAP;
- every rank's loss must be bitwise equal to rank 0's (vpcce merges partials in rank order).

Rank 0 prints one line per rank, ``rank r: PASS`` or ``rank r: FAIL (<case> <quantity>: <error> >
tol <tol>; ...)``, then a summary; every rank exits 1 if any rank failed. An exception on a rank
prints ``rank r: FAIL (exception ...)`` and exits that rank with 1 (torchrun then stops the others).
``--inject-error R`` scales rank R's classifier gradient by 1.1 before the comparison: a self-test
that the checker reports a wrong result (rank R must FAIL, the exit status must be 1).

Device: CUDA (``LOCAL_RANK``) for nccl, CPU otherwise. On CPU, ``--impl triton`` runs the Triton
kernels in the interpreter (``TRITON_INTERPRET=1`` is set at startup if needed; slow, seconds).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

from vpcce import VocabParallelOptions, linear_cross_entropy
from vpcce.launch.process_exit import exit_process
from vpcce.parallel import shard_range

DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# Lowest tolerance per input dtype (loss and LSE, gradients): fp32 and fp64 losses carry a few ulps
# of summation-order difference; 16-bit gradients are rounded to 8 (bf16) or 11 (fp16) bits; the
# hidden gradient is summed over ranks in VocabParallelOptions.reduce_dtype (fp32 by default; fp64
# for fp64 inputs).
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-4, 2e-2),
    torch.float16: (1e-4, 5e-3),
}
# Highest tolerance (loss and LSE, gradients): a single-rank result this far from the fp64
# reference is itself wrong (TF32 dots on fp32 inputs stay near 1e-3), so it cannot widen the bar.
CAP = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-4, 2e-2),
    torch.bfloat16: (1e-3, 5e-2),
    torch.float16: (1e-3, 5e-2),
}
SINGLE_RANK_FACTOR = 4.0  # vocab-parallel error may be this many times the single-rank error
INJECTED_SCALE = 1.1  # --inject-error: the chosen rank's dC is off by 10 %

_OPTIONS = dict(
    bias=True,
    softcap=2.0,
    label_smoothing=0.1,
    ignore=True,
    shift=1,
    reduction="none",
    return_lse=True,
)
CASES = {
    "plain": {},
    "plain_sp": dict(sp=True),
    "options": dict(_OPTIONS),
    "options_sp": dict(_OPTIONS, sp=True),
    "options_sum": dict(_OPTIONS, reduction="sum", logit_scale=0.8),
}


def make_inputs(world: int, args, dtype: torch.dtype, device) -> dict:
    """The global inputs every rank builds identically (seeded CPU generator, then moved)."""
    g = torch.Generator().manual_seed(args.seed)
    b, t, d, v = 2 * world, args.seq_len, args.hidden, args.vocab
    e = torch.randn(b, t, d, generator=g)
    c = 0.3 * (16 / d) ** 0.5 * torch.randn(v, d, generator=g)  # logits of std ~1.2
    bias = 0.5 * torch.randn(v, generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    edges = sorted({i for r in range(world) for s in shard_range(v, r, world) for i in (s - 1, s)})
    edges = [i for i in edges if 0 <= i < v][: targets.numel()]
    targets.view(-1)[: len(edges)] = torch.tensor(edges, dtype=torch.int64)
    w_loss = torch.rand(b, t, generator=g) + 0.5  # per-token loss weights (reduction="none")
    w_lse = 0.1 * torch.randn(b, t, generator=g)  # a z-loss-like term on the LSE
    move = lambda x: x.to(device)
    ignored = targets.clone()
    ignored.view(-1)[len(edges) + 1 :: 4] = -100  # every 4th token after the boundary ids
    return dict(
        e=move(e.to(dtype)),
        c=move(c.to(dtype)),
        bias=move(bias.to(dtype)),
        targets=move(targets),
        ignored=move(ignored),
        w_loss=move(w_loss),
        w_lse=move(w_lse),
    )


def forward_backward(case: dict, data: dict, *, e, c, bias, impl: str, vp=None) -> dict:
    """Loss, LSE and gradients of ``e``, ``c``, ``bias`` of one call (vocab-parallel if ``vp``)."""
    targets = data["ignored"] if case.get("ignore") else data["targets"]
    shift = case.get("shift", 0)
    leaves = [x.detach().clone().requires_grad_() for x in (e, c, bias) if x is not None]
    out = linear_cross_entropy(
        leaves[0],
        leaves[1],
        targets,
        leaves[2] if bias is not None else None,
        softcap=case.get("softcap"),
        reduction=case.get("reduction", "mean"),
        shift=shift,
        return_lse=case.get("return_lse", False),
        impl=impl,
        vocab_parallel_options=vp,
        label_smoothing=case.get("label_smoothing", 0.0),
        logit_scale=case.get("logit_scale", 1.0),
    )
    loss, lse = out if case.get("return_lse") else (out, None)
    weight = lambda w: w[..., shift:].to(loss.dtype)
    objective = (loss * weight(data["w_loss"])).sum() if loss.dim() else loss
    if lse is not None:
        objective = objective + (lse * weight(data["w_lse"])).sum()
    grads = torch.autograd.grad(objective, leaves)
    return dict(
        loss=loss.detach(),
        lse=None if lse is None else lse.detach(),
        de=grads[0],
        dc=grads[1],
        dbias=grads[2] if bias is not None else None,
    )


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x - ref| / max |ref|`` in fp64 (``max |x - ref|`` where ``ref`` is all 0)."""
    if x.shape != ref.shape:
        return float("inf")
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if x.numel() == 0:
        return 0.0
    diff, scale = (x - ref).abs().max().item(), ref.abs().max().item()
    return diff / scale if scale > 0 else diff


def check_case(name: str, case: dict, rank: int, world: int, args, device) -> list[tuple]:
    """``(case, quantity, error, tolerance)`` of every quantity this rank owns in one case."""
    dtype = DTYPES[args.dtype]
    data = make_inputs(world, args, dtype, device)
    full = dict(e=data["e"], c=data["c"], bias=data["bias"] if case.get("bias") else None)
    vp = VocabParallelOptions.from_vocab(args.vocab, sequence_parallel=case.get("sp", False))

    # 1. vocab-parallel: this rank's shard (and token slice under sequence parallelism)
    mine = forward_backward(
        case,
        data,
        impl=args.impl,
        vp=vp,
        e=full["e"].chunk(world, dim=0)[rank] if vp.sequence_parallel else full["e"],
        c=full["c"][vp.start : vp.stop],
        bias=None if full["bias"] is None else full["bias"][vp.start : vp.stop],
    )
    if args.inject_error == rank:
        mine["dc"] = mine["dc"] * INJECTED_SCALE

    # 2. one rank, full inputs: fp64 reference and the same impl / dtype (sets the tolerance)
    ref = forward_backward(case, data, impl="torch", **{k: _f64(x) for k, x in full.items()})
    single = forward_backward(case, data, impl=args.impl, **full)

    def owned(out: dict) -> dict:
        de = out["de"].chunk(world, dim=0)[rank] if vp.sequence_parallel else out["de"]
        q = {"loss": out["loss"], "dE": de, "dC": out["dc"][vp.start : vp.stop]}
        if out["lse"] is not None:
            q["lse"] = out["lse"]
        if out["dbias"] is not None:
            q["dbias"] = out["dbias"][vp.start : vp.stop]
        return q

    got = {"loss": mine["loss"], "dE": mine["de"], "dC": mine["dc"]}
    if mine["lse"] is not None:
        got["lse"] = mine["lse"]
    if mine["dbias"] is not None:
        got["dbias"] = mine["dbias"]
    want, base = owned(ref), owned(single)
    records = []
    for q, x in got.items():
        i = 0 if q in ("loss", "lse") else 1
        tol = min(CAP[dtype][i], max(TOL[dtype][i], SINGLE_RANK_FACTOR * rel_err(base[q], want[q])))
        records.append((name, q, rel_err(x, want[q]), tol))

    # 3. every rank's loss bitwise equal to rank 0's
    losses = [None] * world
    dist.all_gather_object(losses, mine["loss"].cpu())
    same = all(torch.equal(losses[0], x) for x in losses)
    records.append((name, "loss bitwise equal on all ranks", 0.0 if same else 1.0, 0.0))
    return records


def _f64(x):
    return None if x is None else x.double()


def _failures(records: list[tuple]) -> list[tuple]:
    return [r for r in records if not r[2] <= r[3]]  # NaN errors fail


def _fail_text(failures: list[tuple], limit: int = 3) -> str:
    parts = [f"{case} {q}: {err:.1e} > tol {tol:.1e}" for case, q, err, tol in failures[:limit]]
    if len(failures) > limit:
        parts.append(f"+{len(failures) - limit} more")
    return "; ".join(parts)


def _setup(args):
    """Backend, device and process group; returns (rank, world, device)."""
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if (
        args.impl == "triton"
        and device.type != "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        if "vpcce.kernels" in sys.modules:
            raise ValueError("--impl triton on CPU needs TRITON_INTERPRET=1 in the environment")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported and decorated
    timeout = datetime.timedelta(seconds=args.timeout)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # a plain `python -m vpcce.launch.check`: a group of one
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    return dist.get_rank(), dist.get_world_size(), device


def _describe(world: int, args, device) -> str:
    sizes = [b - a for a, b in (shard_range(args.vocab, r, world) for r in range(world))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (
        f"vpcce cluster check: world {world}, backend {dist.get_backend()}, device {name}, "
        f"impl {args.impl}, dtype {args.dtype}; "
        f"e [{2 * world}, {args.seq_len}, {args.hidden}], V {args.vocab} "
        f"(shard rows {sizes if world <= 16 else f'{min(sizes)}..{max(sizes)}'}); "
        f"cases {', '.join(CASES)}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default=None, help="nccl (CUDA) if available, else gloo")
    parser.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    # (no --t / --d / --v: torchrun would take them for abbreviations of its own options)
    parser.add_argument("--seq-len", type=int, default=9, help="T (the shift is along it)")
    parser.add_argument("--hidden", type=int, default=40, help="D")
    parser.add_argument("--vocab", type=int, default=1031, help="global vocabulary size V")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout, seconds")
    parser.add_argument(
        "--inject-error",
        type=int,
        default=None,
        metavar="RANK",
        help="self-test: perturb this rank's dC so that it must FAIL",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="rank 0 prints every error")
    args = parser.parse_args(argv)
    if args.seq_len < 2 or args.hidden < 1 or args.vocab < 1:
        parser.error(
            "need --seq-len >= 2, --hidden >= 1, --vocab >= 1; "
            f"got {args.seq_len}, {args.hidden}, {args.vocab}"
        )

    rank, world, device = _setup(args)
    if args.vocab < world:
        parser.error(f"--vocab {args.vocab} gives some of the {world} ranks an empty shard")
    records = []
    try:
        for name, case in CASES.items():
            records += check_case(name, case, rank, world, args, device)
    except Exception as err:  # noqa: BLE001 - this rank's verdict; torchrun stops the others
        traceback.print_exc()
        print(f"rank {rank}: FAIL (exception: {type(err).__name__}: {err})", flush=True)
        return 1

    every = [None] * world
    dist.all_gather_object(every, records)
    failed = [r for r in range(world) if _failures(every[r])]
    if rank == 0:
        print(_describe(world, args, device))
        for r in range(world):
            bad = _failures(every[r])
            print(f"rank {r}: FAIL ({_fail_text(bad)})" if bad else f"rank {r}: PASS")
            if args.verbose:
                for case, q, err, tol in every[r]:
                    print(f"  rank {r} {case} {q}: error {err:.2e}, tol {tol:.2e}")
        print(f"FAIL: ranks {failed}" if failed else f"PASS: all {world} ranks", flush=True)
    dist.barrier()  # leave together: tearing down gloo while a peer still works can abort it
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    exit_process(main())
