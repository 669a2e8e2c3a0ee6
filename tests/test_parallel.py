"""Vocab-parallel acceptance tests on CPU gloo: the reference (``impl="torch"``) and the Triton
kernels (``impl="triton"``, in Triton's CPU interpreter).

Each world size W in (2, 3, 4) is one spawned group that runs every case of `CASES` (spawning costs
seconds, a case milliseconds; a Triton case in the interpreter a fraction of a second). The Triton
cases (``impl="triton"``, names ``triton_*``) repeat a representative subset of the reference cases
with D = `D_TRITON` (one partial 64-wide hidden step of `INTERPRETER_BLOCKS`) or D = 64 (an even
one); they run only where the parent has ``TRITON_INTERPRET=1`` (tests/conftest.py sets it without
CUDA; the spawned ranks inherit the environment, and each rank reports whether its kernels really
are interpreted). Every rank returns its outputs and the gradients of its own inputs; the parent
compares them with a single-process fp64 truth over the global vocabulary:

- loss, LSE, entropy: relative error <= 1e-6; every rank's loss and LSE bitwise equal;
- dE (this rank's slice under sequence parallelism; summed over ranks when ``reduce_e_grad=False``),
  and the rank's dC / dbias shard against the matching rows of the global truth: <= 1e-5.

Relative errors are ``max |x - truth| / max |truth|`` in fp64. Inputs are fp32, except the bf16
Triton cases (``dtype="bf16"``): their loss, LSE and entropy are held to `BF16_LOSS_TOL` and their
gradients to `BF16_GRAD_TOL` against the single-process (no vocab parallelism) ``impl="triton"``
call on the same bf16 inputs, computed in the parent; their loss, LSE and entropy also to the fp64
truth of those inputs within the fp32 bound. The shards are uneven (V = 301 over 2, 3 and 4 ranks)
unless a case says otherwise. Every rank also reports which implementation's functions ran.

The same groups count collectives (torch.distributed functions and ProcessGroup methods, two
independent counters): a repeated non-sequence-parallel call does exactly one in forward and one
(the dE all-reduce) in backward. A W = 3 group checks that bad layouts raise on every rank.
"""

from __future__ import annotations

import importlib
import os
import time
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

import vpcce
from vpcce import LayoutError, VocabParallelOptions, linear_cross_entropy
from vpcce.parallel import collectives, shard_range

V = 301  # prime: uneven shards over 2, 3 and 4 ranks
V_MEGATRON = 312  # a padded vocabulary divisible by 2, 3 and 4
B, T, D = 12, 5, 16  # 3-D hidden states [B, T, D]; B divisible by every W (sequence parallel)
N_2D = 24  # tokens of the 2-D cases [N, D]
# Targets on and next to every shard boundary of V = 301 over 2, 3 and 4 ranks.
EDGE_IDS = (0, 1, 75, 76, 77, 100, 101, 102, 150, 151, 152, 200, 201, 202, 225, 226, 227, 299, 300)
LOSS_TOL = 1e-6  # fp32 loss, LSE and entropy against the fp64 truth
GRAD_TOL = 1e-5  # fp32 gradients against the fp64 truth
# bf16 inputs against the single-process impl="triton" result: loss, LSE and entropy are fp32
# computations on exactly upcast inputs; the gradients are rounded to bf16 (dz, dE per rank)
BF16_LOSS_TOL = 1e-5
BF16_GRAD_TOL = 1e-2
D_TRITON = 80  # hidden size of the Triton cases: 64 + 16, a partial step of INTERPRETER_BLOCKS.d
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_ALL = dict(
    bias=True,
    softcap=2.0,
    logit_scale=0.8,
    label_smoothing=0.1,
    ignore=True,
    shift=1,
    return_lse=True,
)
CASES = {
    "mean": {},
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "bias": dict(bias=True),
    "softcap": dict(softcap=2.0),
    "logit_scale": dict(logit_scale=0.8, reduction="sum"),
    "label_smoothing": dict(label_smoothing=0.1),
    "label_smoothing_none": dict(label_smoothing=0.2, reduction="none", bias=True),
    "ignored": dict(ignore=True),
    "ignored_sum": dict(ignore=True, ignore_index=-1, reduction="sum"),
    "all_ignored": dict(all_ignored=True, bias=True),
    "shift": dict(shift=1),
    "shift_2d": dict(shift=2, dims=2, reduction="none"),
    "lse": dict(return_lse=True),
    "lse_none": dict(return_lse=True, reduction="none", ignore=True),
    "all_mean": dict(_ALL),
    "all_sum_2d": dict(_ALL, reduction="sum", dims=2),
    "all_none": dict(_ALL, reduction="none"),
    "megatron": dict(layout="megatron", bias=True, label_smoothing=0.1),
    "skewed": dict(layout="skewed", bias=True, label_smoothing=0.1, return_lse=True),
    "permuted": dict(layout="permuted", bias=True, ignore=True, reduction="none"),
    "partial_de": dict(reduce_e_grad=False),
    "partial_de_all": dict(_ALL, reduce_e_grad=False, reduction="none"),
    "sp_mean": dict(sp=True),
    "sp_all_none": dict(_ALL, sp=True, reduction="none"),
    "sp_all_mean_2d": dict(_ALL, sp=True, dims=2),
    "sp_shift_sum": dict(sp=True, shift=1, reduction="sum", ignore=True),
    "sp_skewed": dict(sp=True, layout="skewed", bias=True, return_lse=True),
    "sp_megatron": dict(sp=True, layout="megatron", label_smoothing=0.1, reduction="none"),
}
# The Triton path (CPU interpreter): reference cases repeated with impl="triton" and a D that
# exercises the kernels' hidden-dimension steps; every option, both layouts of E (2-D and 3-D),
# uneven / megatron / skewed (a one-row shard) / permuted shards, partial dE, SP on and off.
_TRITON_FROM = {
    "mean": {},
    "sum": dict(d=64),
    "none": dict(d=64),
    "softcap": {},
    "label_smoothing_none": {},
    "ignored_sum": {},
    "all_ignored": {},
    "shift_2d": {},
    "lse_none": {},
    "all_mean": {},
    "all_sum_2d": dict(d=64),
    "all_none": {},
    "megatron": {},
    "skewed": {},
    "permuted": {},
    "partial_de_all": {},
    "sp_mean": {},
    "sp_all_none": {},
    "sp_all_mean_2d": {},
    "sp_shift_sum": dict(d=64),
    "sp_megatron": {},
}
CASES.update(
    {
        f"triton_{name}": {**CASES[name], "impl": "triton", "d": D_TRITON, **extra}
        for name, extra in _TRITON_FROM.items()
    }
)
# backward in several vocabulary chunks of 64 rows: the dE reduction starts before the last
# chunk's dC GEMM (`grad_e_ready`), overlapping it
CASES["triton_chunked_all_none"] = dict(
    _ALL, reduction="none", impl="triton", d=D_TRITON, chunk_bytes=64 * 4 * B * T
)
CASES["triton_sp_chunked_all_mean"] = dict(
    _ALL, sp=True, impl="triton", d=D_TRITON, chunk_bytes=64 * 4 * B * T
)
# bf16: compared with the single-process impl="triton" call (see the module docstring)
CASES["triton_bf16_all_mean"] = dict(_ALL, impl="triton", d=D_TRITON, dtype="bf16")
CASES["triton_bf16_sp_all_none"] = dict(
    _ALL, impl="triton", d=D_TRITON, dtype="bf16", sp=True, reduction="none"
)


def interpreting() -> bool:
    """Whether this process runs Triton kernels in the interpreter (the Triton cases need it)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def case_names() -> list[str]:
    """The cases a group runs here: the Triton ones only under the interpreter."""
    return [n for n, c in CASES.items() if c.get("impl", "torch") == "torch" or interpreting()]


# ---- inputs, identical in the parent and in every rank (seeded CPU generator) ----


def make_inputs(case: dict) -> dict:
    """Global fp32 inputs of a case, and the fp32 weights its backward objective uses."""
    g = torch.Generator().manual_seed(1234)
    vocab = V_MEGATRON if case.get("layout") == "megatron" else V
    lead = (B, T) if case.get("dims", 3) == 3 else (N_2D,)
    d = case.get("d", D)
    dtype = DTYPES[case.get("dtype", "fp32")]
    e = torch.randn(*lead, d, generator=g).to(dtype)
    c = (0.3 * (D / d) ** 0.5 * torch.randn(vocab, d, generator=g)).to(dtype)  # logits std ~1.2
    bias = (0.5 * torch.randn(vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, lead, generator=g)
    flat = targets.view(-1)
    flat[: len(EDGE_IDS)] = torch.tensor(EDGE_IDS)
    ignore_index = case.get("ignore_index", -100)
    if case.get("ignore"):
        flat[3::4] = ignore_index
    if case.get("all_ignored"):
        flat.fill_(ignore_index)
    shift = case.get("shift", 0)
    out_shape = targets[..., shift:].shape
    w_loss = torch.rand(out_shape, generator=g) + 0.5 if case.get("reduction") == "none" else 0.75
    w_lse = 0.1 * torch.randn(out_shape, generator=g)
    return dict(
        e=e,
        c=c,
        bias=bias if case.get("bias") else None,
        targets=targets,
        vocab=vocab,
        w_loss=w_loss,
        w_lse=w_lse if case.get("return_lse") else None,
    )


def loss_options(case: dict) -> dict:
    return dict(
        ignore_index=case.get("ignore_index", -100),
        softcap=case.get("softcap"),
        reduction=case.get("reduction", "mean"),
        shift=case.get("shift", 0),
        label_smoothing=case.get("label_smoothing", 0.0),
        logit_scale=case.get("logit_scale", 1.0),
    )


def shard_of(layout: str, vocab: int, rank: int, world: int) -> tuple[int, int]:
    """The parent's independent expectation of each rank's shard for a layout name."""
    if layout in ("even", "megatron"):  # megatron: V_MEGATRON divides evenly
        return shard_range(vocab, rank, world)
    if layout == "skewed":  # rank 0 owns one id, the others split the rest
        if rank == 0:
            return 0, 1
        start, stop = shard_range(vocab - 1, rank - 1, world - 1)
        return start + 1, stop + 1
    if layout == "permuted":  # shards valid but not in rank order
        return shard_range(vocab, (rank + 1) % world, world)
    raise ValueError(layout)


def options_for(case: dict, vocab: int, rank: int, world: int) -> VocabParallelOptions:
    kw = dict(
        reduce_e_grad=case.get("reduce_e_grad", True), sequence_parallel=case.get("sp", False)
    )
    layout = case.get("layout", "even")
    if layout == "even":
        return VocabParallelOptions.from_vocab(vocab, **kw)
    if layout == "megatron":
        return VocabParallelOptions.from_megatron(vocab, **kw)
    return VocabParallelOptions(*shard_of(layout, vocab, rank, world), **kw)


# ---- fp64 truth: materialized logits over the global vocabulary, autograd for the gradients ----


def truth(case: dict, data: dict) -> dict:
    opts = loss_options(case)
    e = data["e"].double().requires_grad_()
    c = data["c"].double().requires_grad_()
    bias = None if data["bias"] is None else data["bias"].double().requires_grad_()
    shift, a = opts["shift"], opts["label_smoothing"]
    ep = e[..., : e.shape[-2] - shift, :] if shift else e
    y = data["targets"][..., shift:]
    raw = ep @ c.T + (0 if bias is None else bias)  # the logits before scale and softcap
    raw.retain_grad()
    z = raw * opts["logit_scale"]
    if opts["softcap"] is not None:
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    lse = torch.logsumexp(z, dim=-1)
    valid = y != opts["ignore_index"]
    z_y = z.gather(-1, torch.where(valid, y, 0)[..., None]).squeeze(-1)
    nll = torch.where(valid, lse - (1 - a) * z_y - a * z.mean(dim=-1), 0.0)
    if opts["reduction"] == "mean":
        loss = nll.sum() / valid.sum().clamp(min=1)
    elif opts["reduction"] == "sum":
        loss = nll.sum()
    else:
        loss = nll
    objective = (loss * _double(data["w_loss"])).sum()
    if data["w_lse"] is not None:
        objective = objective + (lse * data["w_lse"].double()).sum()
    objective.backward()
    logp = torch.log_softmax(z, dim=-1)
    return dict(
        loss=loss.detach(),
        lse=lse.detach(),
        z=z.detach(),
        dz_raw=raw.grad,
        c=c.detach(),
        entropy=-(logp.exp() * logp).sum(-1).detach(),
        argmax=z.argmax(-1),
        de=e.grad,
        dc=c.grad,
        db=None if bias is None else bias.grad,
    )


def _double(w):
    return w.double() if isinstance(w, torch.Tensor) else float(w)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x - ref| / max |ref|`` in fp64 (``max |x|`` where ``ref`` is all 0); NaN stays NaN."""
    assert x.shape == ref.shape, (tuple(x.shape), tuple(ref.shape))
    x, ref = x.detach().double(), ref.detach().double()
    if x.numel() == 0:
        return 0.0
    scale = ref.abs().max()
    diff = (x - ref).abs().max()
    return float(diff / scale) if scale > 0 else float(diff)


# ---- what a rank runs ----

_BACKENDS = {"torch": "vpcce.reference", "triton": "vpcce.kernels"}


@contextmanager
def recording_backends():
    """The shard implementations called while active, as ``"impl.function"`` names."""
    used, patches = set(), []

    def wrap(label, fn):
        def recorded(*args, **kwargs):
            used.add(label)
            return fn(*args, **kwargs)

        return recorded

    for impl, module_name in _BACKENDS.items():
        module = importlib.import_module(module_name)
        for name in ("forward_partials", "backward"):
            original = getattr(module, name)
            patches.append((module, name, original))
            setattr(module, name, wrap(f"{impl}.{name}", original))
    try:
        yield used
    finally:
        for module, name, original in reversed(patches):
            setattr(module, name, original)


def run_case(rank: int, world: int, case: dict) -> dict:
    """One forward + backward on this rank; its outputs and the gradients of its inputs."""
    data = make_inputs(case)
    vp = options_for(case, data["vocab"], rank, world)
    e = data["e"].chunk(world, dim=0)[rank].clone() if vp.sequence_parallel else data["e"].clone()
    c = data["c"][vp.start : vp.stop].clone()
    bias = None if data["bias"] is None else data["bias"][vp.start : vp.stop].clone()
    for t in (e, c, bias):
        if t is not None:
            t.requires_grad_()
    with recording_backends() as used:
        out = linear_cross_entropy(
            e,
            c,
            data["targets"],
            bias,
            impl=case.get("impl", "torch"),
            vocab_parallel_options=vp,
            return_lse=case.get("return_lse", False),
            return_stats=True,
            chunk_bytes=case.get("chunk_bytes"),
            **loss_options(case),
        )
        loss, *rest, stats = out
        lse = rest[0] if rest else None
        objective = (loss * data["w_loss"]).sum()
        if lse is not None:
            objective = objective + (lse * data["w_lse"]).sum()
        objective.backward()
    return dict(
        backends=sorted(used),
        start=vp.start,
        stop=vp.stop,
        loss=loss.detach(),
        lse=None if lse is None else lse.detach(),
        loss_bytes=loss.detach().numpy().tobytes(),
        lse_bytes=None if lse is None else lse.detach().numpy().tobytes(),
        entropy=stats.entropy,
        argmax=stats.argmax,
        de=e.grad,
        dc=c.grad,
        db=None if bias is None else bias.grad,
    )


_DIST_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)
_PG_COLLECTIVES = (
    "allreduce",
    "allgather",
    "_allgather_base",
    "all_gather_single",
    "allgather_coalesced",
    "allgather_into_tensor_coalesced",
    "all_gather_single_coalesced",
    "allreduce_coalesced",
    "reduce_scatter",
    "_reduce_scatter_base",
    "reduce_scatter_single",
    "reduce_scatter_tensor_coalesced",
    "reduce_scatter_single_coalesced",
    "alltoall",
    "alltoall_base",
    "all_to_all_single",
    "broadcast",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
)


@contextmanager
def counting_collectives():
    """Count collectives two independent ways while active.

    ``counts["api"]``: outermost calls of the torch.distributed functions plus the functions
    `vpcce.parallel.collectives` bound at import (a deprecated alias calling the new name counts
    once). ``counts["pg"]``: outermost calls of the ProcessGroup methods they end in.
    """
    counts, depth, patches = Counter(), Counter(), []

    def wrap(kind, fn):
        def counted(*args, **kwargs):
            if depth[kind] == 0:
                counts[kind] += 1
            depth[kind] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[kind] -= 1

        return counted

    targets = [(dist, n, "api") for n in _DIST_COLLECTIVES]
    targets += [(collectives, "_all_gather", "api"), (collectives, "_reduce_scatter", "api")]
    targets += [(dist.ProcessGroup, n, "pg") for n in _PG_COLLECTIVES]
    for owner, name, kind in targets:
        if hasattr(owner, name):
            original = getattr(owner, name)
            patches.append((owner, name, original))
            setattr(owner, name, wrap(kind, original))
    try:
        yield counts
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


# Configurations whose collectives are counted: (case, forward calls of the first and of a
# repeated call, backward calls). The first call adds the layout verification; backward of
# sequence parallel re-gathers the hidden states and reduce-scatters their gradient.
COUNTED = {
    "count_plain": (dict(bias=True, ignore_index=-7), (2, 1), 1),
    "count_lse": (dict(return_lse=True, reduction="none", ignore_index=-7), (2, 1), 1),
    "count_partial_de": (dict(reduce_e_grad=False, ignore_index=-7), (2, 1), 0),
    "count_sp": (dict(sp=True, ignore_index=-7), (3, 2), 2),
    # the Triton backward starts the same one dE reduction (from its `grad_e_ready` callback);
    # ignore_index -8: layouts not yet verified (the verification cache does not key on impl)
    "count_plain_triton": (dict(bias=True, ignore_index=-8, impl="triton", d=64), (2, 1), 1),
    "count_partial_de_triton": (
        dict(reduce_e_grad=False, ignore_index=-8, impl="triton", d=64),
        (2, 1),
        0,
    ),
    "count_sp_triton": (dict(sp=True, ignore_index=-8, impl="triton", d=64), (3, 2), 2),
}


def counted_names() -> list[str]:
    return [n for n, s in COUNTED.items() if s[0].get("impl", "torch") == "torch" or interpreting()]


def count_case(rank: int, world: int, case: dict) -> list[dict]:
    """Collective counts of forward and backward, for a first and a repeated call."""
    data = make_inputs(case)
    vp = options_for(case, data["vocab"], rank, world)
    calls = []
    for _ in range(2):
        e = data["e"].chunk(world, dim=0)[rank] if vp.sequence_parallel else data["e"]
        e = e.clone().requires_grad_()
        c = data["c"][vp.start : vp.stop].clone().requires_grad_()
        bias = None if data["bias"] is None else data["bias"][vp.start : vp.stop].clone()
        with counting_collectives() as fwd:
            out = linear_cross_entropy(
                e,
                c,
                data["targets"],
                bias,
                impl=case.get("impl", "torch"),
                vocab_parallel_options=vp,
                return_lse=case.get("return_lse", False),
                **loss_options(case),
            )
        loss = out[0] if isinstance(out, tuple) else out
        objective = (loss * data["w_loss"]).sum()
        if isinstance(out, tuple):
            objective = objective + (out[1] * data["w_lse"]).sum()
        with counting_collectives() as bwd:
            objective.backward()
        calls.append(dict(forward=dict(fwd), backward=dict(bwd)))
    return calls


def triton_runs_interpreted() -> bool:
    """The kernels this process launches are Triton's interpreter functions (TRITON_INTERPRET was
    set before triton was imported), not compiled ones."""
    from triton.runtime.interpreter import InterpretedFunction

    # by module name: the package vpcce.kernels binds the function `backward` over its submodule
    forward = importlib.import_module("vpcce.kernels.forward")
    backward = importlib.import_module("vpcce.kernels.backward")
    kernels = (forward._cce_fwd_kernel, backward._cce_dlogits_kernel)
    return all(isinstance(k, InterpretedFunction) for k in kernels)


def rank_main(rank: int, world: int, case_names: list[str], counted: list[str]) -> dict:
    assert torch.get_num_threads() == 1
    triton_cases = any(CASES[n].get("impl") == "triton" for n in case_names)
    # a rank without the interpreter would fail (or, on a GPU host, compile): say why up front
    assert not triton_cases or (interpreting() and triton_runs_interpreted()), (
        f"rank {rank}: Triton cases need the interpreter in the spawned ranks; "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}"
    )
    results = {name: run_case(rank, world, CASES[name]) for name in case_names}
    counts = {name: count_case(rank, world, COUNTED[name][0]) for name in counted}
    return dict(
        cases=results,
        counts=counts,
        interpreted=triton_runs_interpreted() if triton_cases else None,
    )


# ---- checks in the parent ----


def single_process(case: dict, data: dict) -> dict:
    """The case's plain call (global vocabulary, no vocab parallelism) in this process."""
    e = data["e"].clone().requires_grad_()
    c = data["c"].clone().requires_grad_()
    bias = None if data["bias"] is None else data["bias"].clone().requires_grad_()
    loss, lse, stats = linear_cross_entropy(
        e,
        c,
        data["targets"],
        bias,
        impl=case.get("impl", "torch"),
        return_lse=True,
        return_stats=True,
        chunk_bytes=case.get("chunk_bytes"),
        **loss_options(case),
    )
    objective = (loss * data["w_loss"]).sum()
    if data["w_lse"] is not None:
        objective = objective + (lse * data["w_lse"]).sum()
    objective.backward()
    return dict(
        loss=loss.detach(),
        lse=lse.detach(),
        entropy=stats.entropy,
        de=e.grad,
        dc=c.grad,
        db=None if bias is None else bias.grad,
    )


def check_case(name: str, world: int, ranks: list[dict]) -> list[str]:
    """Every mismatch of one case against the fp64 truth, as readable lines.

    bf16 cases: loss, LSE, entropy and the gradients against the single-process call of the same
    implementation instead (`BF16_LOSS_TOL`, `BF16_GRAD_TOL`); argmax still against the truth.
    """
    case = CASES[name]
    data = make_inputs(case)
    ref = truth(case, data)
    if case.get("dtype", "fp32") == "fp32":
        exp, loss_tol, grad_tol = ref, LOSS_TOL, GRAD_TOL
    else:
        assert case.get("reduce_e_grad", True), "bf16 cases compare reduced dE only"
        exp, loss_tol, grad_tol = single_process(case, data), BF16_LOSS_TOL, BF16_GRAD_TOL
    bad = []

    def expect(what, err, tol):
        if not err <= tol:
            bad.append(f"{name} W={world} {what}: rel err {err:.3g} > {tol:g}")

    impl = case.get("impl", "torch")
    for r, out in enumerate(ranks):
        if out["backends"] != [f"{impl}.backward", f"{impl}.forward_partials"]:
            bad.append(f"{name} W={world} rank {r}: ran {out['backends']}, not impl={impl!r}")
        expected = shard_of(case.get("layout", "even"), data["vocab"], r, world)
        if (out["start"], out["stop"]) != expected:
            bad.append(
                f"{name} W={world} rank {r}: shard {(out['start'], out['stop'])} != {expected}"
            )
            continue
        start, stop = expected
        expect(f"rank {r} loss", rel_err(out["loss"], exp["loss"]), loss_tol)
        expect(f"rank {r} entropy", rel_err(out["entropy"], exp["entropy"]), loss_tol)
        if case.get("return_lse"):
            expect(f"rank {r} lse", rel_err(out["lse"], exp["lse"]), loss_tol)
        if exp is not ref:  # bf16: logits are fp32 dots of exactly upcast inputs, so these hold
            # fp32 accuracy against the truth on the same (bf16-valued) inputs as well
            for key in ("loss", "entropy") + (("lse",) if case.get("return_lse") else ()):
                expect(f"rank {r} {key} vs fp64 truth", rel_err(out[key], ref[key]), LOSS_TOL)
        # argmax: exact, except where fp32 cannot tell two logits apart
        z = ref["z"].reshape(-1, ref["z"].shape[-1])
        got, want = out["argmax"].reshape(-1), ref["argmax"].reshape(-1)
        gap = z.gather(1, want[:, None]) - z.gather(1, got.clamp(0, z.shape[1] - 1)[:, None])
        if ((got != want) & ~(gap.squeeze(1) <= 1e-5)).any():
            bad.append(f"{name} W={world} rank {r} argmax differs from the truth beyond ties")
        expect(f"rank {r} dC shard", rel_err(out["dc"], exp["dc"][start:stop]), grad_tol)
        if case.get("bias"):
            expect(f"rank {r} dbias shard", rel_err(out["db"], exp["db"][start:stop]), grad_tol)
        if case.get("sp"):
            expect(f"rank {r} dE slice", rel_err(out["de"], exp["de"].chunk(world, 0)[r]), grad_tol)
        elif case.get("reduce_e_grad", True):
            expect(f"rank {r} dE", rel_err(out["de"], exp["de"]), grad_tol)
        else:  # this rank's partial: its shard's logits' gradient times its classifier rows
            # (dz_raw is the gradient w.r.t. e @ c.T + b: scale and softcap are inside it)
            part = torch.zeros_like(ref["de"])
            shift = case.get("shift", 0)
            view = part[..., : part.shape[-2] - shift, :] if shift else part
            view += ref["dz_raw"][..., start:stop] @ ref["c"][start:stop]
            expect(f"rank {r} partial dE", rel_err(out["de"], part), GRAD_TOL)
    if not case.get("sp") and not case.get("reduce_e_grad", True):
        total = sum(out["de"].double() for out in ranks)
        expect("sum over ranks of partial dE", rel_err(total, ref["de"]), GRAD_TOL)
    for key in ("loss_bytes", "lse_bytes"):
        if len({out[key] for out in ranks}) != 1:
            bad.append(f"{name} W={world}: {key[:-6]} differs bitwise between ranks")
    return bad


@pytest.mark.parametrize("world", [2, 3, 4])
def test_vocab_parallel_matches_fp64_truth(world):
    names, counted = case_names(), counted_names()
    ranks = run_ranks(rank_main, world, names, counted, timeout=240)
    bad = []
    if any(CASES[n].get("impl") == "triton" for n in names):
        for r, out in enumerate(ranks):
            if out["interpreted"] is not True:
                bad.append(f"W={world} rank {r}: the Triton kernels did not run interpreted")
    for name in names:
        bad += check_case(name, world, [r["cases"][name] for r in ranks])
    for name in counted:
        _, (first, repeat), backward = COUNTED[name]
        for r, out in enumerate(ranks):
            want = [dict(forward=first, backward=backward), dict(forward=repeat, backward=backward)]
            got = [
                dict(forward=call["forward"].get(kind, 0), backward=call["backward"].get(kind, 0))
                for call in out["counts"][name]
                for kind in ("api", "pg")
            ]
            if got != [w for w in want for _ in ("api", "pg")]:
                bad.append(
                    f"{name} W={world} rank {r}: collectives (api, pg per call) {got}, "
                    f"expected {want}"
                )
    assert not bad, "\n".join(bad)


# ---- bad layouts: every rank raises LayoutError, nobody hangs ----

# kind -> (exception every rank must raise, words its message must contain)
BAD_LAYOUTS = {
    "gap": ("LayoutError", "gap at id 101"),
    "overlap": ("LayoutError", "overlap at id 100"),
    "shifted_start": ("LayoutError", "gap at id 0"),
    "inconsistent_vocab": ("LayoutError", "overlap at id 100"),
    "duplicate": ("LayoutError", "overlap at id 0"),
    "tokens": ("LayoutError", "number of tokens"),
    "options": ("LayoutError", "loss options"),
    # the forward skips the entropy / argmax partials on ranks that do not return them
    "return_stats": ("LayoutError", "loss options"),
    # the hidden gradient's all-reduce would mix buffers of different sizes
    "reduce_dtype": ("LayoutError", "loss options"),
    "input_dtype": ("LayoutError", "inputs' dtype"),
    # the ranks agree on V = 300 but a target is 300: a plain ValueError, still on every rank
    "targets_beyond_vocab": ("ValueError", "targets must be in [0, 300)"),
}


def bad_layout_call(rank: int, world: int, kind: str):
    """A call in which the ranks' layouts disagree as ``kind`` says (rank 1 is the odd one)."""
    data = make_inputs(dict(bias=True))
    start, stop = shard_range(V, rank, world)
    e, targets, reduction = data["e"], data["targets"], "mean"
    return_stats = kind == "return_stats" and rank == 1
    reduce_dtype = torch.bfloat16 if kind == "reduce_dtype" and rank == 1 else torch.float32
    if kind == "gap" and rank == 1:
        start += 1
    elif kind == "overlap" and rank == 1:
        start -= 1
    elif kind == "shifted_start":  # every shard one id up: nobody owns id 0
        start, stop = start + 1, stop + 1
    elif kind == "inconsistent_vocab" and rank == 1:  # this rank believes V = 300
        start, stop = shard_range(V - 1, rank, world)
    elif kind == "duplicate" and rank == 1:
        start, stop = shard_range(V, 0, world)
    elif kind == "tokens" and rank == 1:
        e, targets = e[:-1], targets[:-1]
    elif kind == "options" and rank == 1:
        reduction = "sum"
    elif kind == "targets_beyond_vocab":
        start, stop = shard_range(V - 1, rank, world)
    # classifier rows for the claimed shard, even where it reaches past the V rows of the data
    c = torch.cat((data["c"], data["c"]))[start:stop]
    bias = torch.cat((data["bias"], data["bias"]))[start:stop]
    if kind == "input_dtype" and rank == 1:
        e, c, bias = e.double(), c.double(), bias.double()
    return linear_cross_entropy(
        e,
        c,
        targets,
        bias,
        impl="torch",
        reduction=reduction,
        vocab_parallel_options=VocabParallelOptions(start, stop, reduce_dtype=reduce_dtype),
        return_stats=return_stats,
    )


def bad_layout_rank(rank: int, world: int) -> dict:
    outcomes = {}
    for kind in BAD_LAYOUTS:
        t0 = time.monotonic()
        try:
            bad_layout_call(rank, world, kind)
            outcomes[kind] = ("returned", "", time.monotonic() - t0)
        except Exception as exc:  # noqa: BLE001 - the parent checks the type
            outcomes[kind] = (type(exc).__name__, str(exc), time.monotonic() - t0)
    # the group is still usable, and in step, after the errors
    good = run_case(rank, world, CASES["bias"])
    return dict(outcomes=outcomes, good=good)


def test_bad_layouts_raise_on_every_rank():
    world = 3
    ranks = run_ranks(bad_layout_rank, world, timeout=90)
    bad = []
    for kind, (want, words) in BAD_LAYOUTS.items():
        for r, out in enumerate(ranks):
            name, message, seconds = out["outcomes"][kind]
            if name != want or words not in message or seconds >= 30:
                bad.append(f"{kind} rank {r}: {name} after {seconds:.1f} s: {message!r}")
    assert not bad, "\n".join(bad)
    assert issubclass(LayoutError, ValueError)
    assert check_case("bias", world, [out["good"] for out in ranks]) == []


# ---- single process ----


def test_world_size_one_equals_the_plain_call():
    assert not dist.is_initialized()
    for name in ("all_none", "all_mean", "skewed"):
        case = {k: v for k, v in CASES[name].items() if k != "layout"}
        data = make_inputs(case)
        runs = []
        for vp in (
            None,
            VocabParallelOptions(0, data["vocab"]),
            VocabParallelOptions.from_vocab(data["vocab"]),
        ):
            e = data["e"].clone().requires_grad_()
            c = data["c"].clone().requires_grad_()
            bias = None if data["bias"] is None else data["bias"].clone().requires_grad_()
            with counting_collectives() as counts:
                loss, lse = linear_cross_entropy(
                    e,
                    c,
                    data["targets"],
                    bias,
                    impl="torch",
                    vocab_parallel_options=vp,
                    return_lse=True,
                    **loss_options(case),
                )
                ((loss * data["w_loss"]).sum() + (lse * data["w_lse"]).sum()).backward()
            assert not counts, counts
            runs.append([loss, lse, e.grad, c.grad, None if bias is None else bias.grad])
        for run in runs[1:]:
            for got, want in zip(run, runs[0], strict=True):
                assert (got is None and want is None) or torch.equal(got, want), name


def test_truth_matches_torch_cross_entropy():
    """The local truth agrees with F.cross_entropy (label smoothing, ignore_index) in fp64."""
    case = dict(label_smoothing=0.1, ignore=True, bias=True)
    data = make_inputs(case)
    ref = truth(case, data)
    logits = (data["e"].double() @ data["c"].double().T + data["bias"].double()).reshape(-1, V)
    want = torch.nn.functional.cross_entropy(
        logits, data["targets"].reshape(-1), label_smoothing=0.1
    )
    assert rel_err(ref["loss"], want) <= 1e-14
    assert vpcce.LayoutError is LayoutError
