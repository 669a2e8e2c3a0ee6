"""Tuning round on the GPU: kernel variants A/B in one run, against the fp64 truth and cuBLAS.

    python -m vpcce.launch.sweep --n 8192 --d 2304 --v 256000 --sizes 1024,32768 --profile

- forward: each tile variant of `FORWARD_VARIANTS` times `forward_partials` alone and reports
  its LSE error against the fp64 LSE;
- backward: each variant of `BACKWARD_VARIANTS` (backward tiles, dE accumulator) times
  forward+backward through `linear_cross_entropy` and reports loss / dE / dC errors against the
  fp64 truth and the memory beyond inputs, dE and dC;
- filter (``--sections filter``): each `FILTER_VARIANTS` entry (exact, apple's tile filter
  with or without the forward's tile bounds, the chunk GEMM dispatch) with its errors and the
  fraction of tiles dropped without recompute; ``--sort-vocab`` numbers the vocabulary by
  frequency;
- ``--sizes``: forward+backward time per token of the default at other token counts (same D, V);
- ``--profile``: GPU time per kernel of one forward+backward (torch.profiler), default mode or
  ``--profile-filter-eps``.

Data: LM-like peaked logits (`vpcce.launch.data.lm_like`). Markdown tables are printed last;
``--json`` keeps every number.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace

import torch
from triton.testing import do_bench

import vpcce.function as function_module
from vpcce.kernels import common, forward_partials, grad_e
from vpcce.launch.data import lm_like
from vpcce.launch.kernel_check import extra_memory_mb, fwd_bwd, rel, truth, vpcce_loss
from vpcce.layout import make_layout
from vpcce.partials import MAX, SUMEXP

# the module (the package exports the function `backward` under the same name)
bwd_module = importlib.import_module("vpcce.kernels.backward")
matmul_module = importlib.import_module("vpcce.kernels.matmul")
FWD, BWD = common.GPU_FORWARD_BLOCKS, common.GPU_BLOCKS
# the round-8 tiles: 128 x 128, 4 stages, split accumulation (forward and backward)
ROUND8 = replace(BWD, v=128, stages=4, split_acc=True)
HOPPER = common.HOPPER_FORWARD_BLOCKS
# name -> (Triton forward tiles, warp-specialized Hopper tiles or None for the Triton kernel,
# vocabulary splits: None = the default heuristic, `forward_partials` keywords)
LOSS_ONLY = {"stats": False, "sum_z": False}  # what `linear_cross_entropy` asks without stats
FORWARD_VARIANTS = {
    "hopper ws 128x256 s4, chains of 2, loss only (default)": (FWD, HOPPER, None, LOSS_ONLY),
    "hopper ws, every column (return_stats, round 14 default)": (FWD, HOPPER, None, {}),
    "hopper ws, loss only, 8 splits": (FWD, HOPPER, 8, LOSS_ONLY),
    "hopper ws, loss only, chains of 1 K step": (
        FWD, replace(HOPPER, split_every=1), None, LOSS_ONLY,
    ),
    "triton 64x256 w8 s4, split (round 11 default)": (FWD, None, None, {}),
    "triton 64x256 w8 s4, split, loss only": (FWD, None, None, LOSS_ONLY),
}  # fmt: skip
# name -> (backward tiles, `vpcce.kernels.grad_e` settings to override (e.g. MAX_RECOMPUTE 0: no
# scratch, the hi/lo pair), forward tiles, warp-specialized Hopper dlogits tiles or None for the
# Triton kernel)
HOPPER_BWD = common.HOPPER_BACKWARD_BLOCKS
BACKWARD_VARIANTS = {
    "hopper ws dlogits 128x256 s3, persistent grid (default)": (BWD, {}, FWD, HOPPER_BWD),
    "hopper ws dlogits, the scratch's rows always last (round 17)": (
        BWD, {"NARROW_PRODUCT": 0}, FWD, HOPPER_BWD,
    ),
    "triton dlogits 128x256 s3 chained, group 8 (round 11 default)": (BWD, {}, FWD, None),
}  # fmt: skip


# name -> (linear_cross_entropy options, (dE, dC) densest sparse chunk or None: the defaults,
# tile summaries on, the Hopper tile-skipping GEMM on)
FILTER_VARIANTS = {
    "exact (filter_eps=None)": ({"filter_eps": None}, None, True, True),
    "2^-12, planned (default)": ({"filter_eps": 2.0**-12}, None, True, True),
    "2^-12, planned, dense GEMMs": ({"filter_eps": 2.0**-12}, (0.0, 0.0), True, True),
    "2^-12, planned, sparse at <= 0.5": ({"filter_eps": 2.0**-12}, (0.5, 0.5), True, True),
    "2^-12, planned, Triton GEMM (round 10)": ({"filter_eps": 2.0**-12}, None, True, False),
    "2^-12, compute-time filter only": ({"filter_eps": 2.0**-12}, None, False, True),
    "1e-5, planned": ({"filter_eps": 1e-5}, None, True, True),
}


@contextmanager
def variant(forward=None, backward=None, scratch=None, hopper=HOPPER, hopper_backward=HOPPER_BWD):
    """Temporarily swap the module-level tile tables and `vpcce.kernels.grad_e` settings
    (``scratch``: name -> value) the kernels read (``hopper=None`` / ``hopper_backward=None``:
    the Triton kernels even where the warp-specialized ones run)."""
    names = (
        "GPU_FORWARD_BLOCKS",
        "GPU_BLOCKS",
        "HOPPER_FORWARD_BLOCKS",
        "HOPPER_BACKWARD_BLOCKS",
    )
    saved = [getattr(common, name) for name in names]
    scratch = scratch or {}
    saved_scratch = {name: getattr(grad_e, name) for name in scratch}
    for name, value in zip(names, (forward or saved[0], backward or saved[1], hopper,
                                   hopper_backward), strict=True):  # fmt: skip
        setattr(common, name, value)
    for name, value in scratch.items():
        setattr(grad_e, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(common, name, value)
        for name, value in saved_scratch.items():
            setattr(grad_e, name, value)


@contextmanager
def failure_noted(rows: list, name: str):
    """A variant that does not compile or run (e.g. out of shared memory) becomes a table row."""
    try:
        yield
    except Exception as err:  # out of resources, a compile error: the sweep goes on
        rows.append({"variant": name, "error": f"{type(err).__name__}: {str(err)[:80]}"})


def median_ms(fn, rep=300) -> float:
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def gemm_ms(e, c) -> float:
    return median_ms(lambda: e @ c.T)


def fwbw_ms(e, c, y, **kw) -> float:
    ec = e.detach().requires_grad_(), c.detach().requires_grad_()
    return median_ms(lambda: torch.autograd.grad(vpcce_loss(*ec, y, **kw), ec), rep=500)


def fp64_lse(e, c, chunk=512):
    c64 = c.double()
    return torch.cat(
        [torch.logsumexp(e[i : i + chunk].double() @ c64.T, dim=1) for i in range(0, len(e), chunk)]
    )


def sweep_forward(e, c, y) -> list[dict]:
    layout = make_layout(e, y, 0)
    want = fp64_lse(e, c)
    rows = []
    for name, (cfg, hopper, splits, kw) in FORWARD_VARIANTS.items():
        with variant(forward=cfg, hopper=hopper), failure_noted(rows, name):

            def run(splits=splits, kw=kw):
                return forward_partials(
                    layout, c, None, vocab_start=0, logit_scale=1.0, softcap=None,
                    num_splits=splits, **kw,
                )

            parts = run()
            lse = parts[:, MAX].double() + parts[:, SUMEXP].double().log()
            rows.append(
                {
                    "variant": name,
                    "ms": median_ms(run),
                    "lse_max_abs_err": (lse - want).abs().max().item(),
                    "lse_mean_err": (lse - want).mean().item(),  # the sign shows a bias
                }
            )
        print(rows[-1], flush=True)
    return rows


def sweep_backward(e, c, y) -> list[dict]:
    t_loss, t_de, t_dc = truth(e, c, y)
    rows = []
    for name, (cfg, scratch, fwd, hopper_bwd) in BACKWARD_VARIANTS.items():
        with (
            variant(fwd, cfg, scratch, hopper_backward=hopper_bwd),
            failure_noted(rows, name),
        ):
            loss, de, dc = fwd_bwd(vpcce_loss, e, c, y)
            again = fwd_bwd(vpcce_loss, e, c, y)
            rows.append(
                {
                    "variant": name,
                    "fwbw_ms": fwbw_ms(e, c, y),
                    "loss_err": abs(loss.double().item() - t_loss.item()) / abs(t_loss.item()),
                    "de_err": rel(de, t_de),
                    "dc_err": rel(dc, t_dc),
                    "deterministic": all(
                        torch.equal(a, b) for a, b in zip((loss, de, dc), again, strict=True)
                    ),
                    "extra_mb": extra_memory_mb(vpcce_loss, e, c, y),
                }
            )
            del loss, de, dc, again
        print(rows[-1], flush=True)
    return rows


LIMITS = ("SPARSE_E_MAX", "SPARSE_C_MAX", "HOPPER_SPARSE_E_MAX", "HOPPER_SPARSE_C_MAX")


@contextmanager
def filter_variant(sparse_max, summaries: bool, hopper_gemm: bool, plans: list):
    """Swap the chunk dispatch thresholds (both GEMMs') / turn the tile summaries or the Hopper
    GEMM off; record the plans."""
    saved_limits = [getattr(bwd_module, name) for name in LIMITS]
    saved = bwd_module.skip_plan.plan
    saved_uses = function_module.uses_tile_summaries
    saved_hopper = matmul_module._hopper_sparse
    if sparse_max is not None:
        for name, value in zip(LIMITS, sparse_max * 2, strict=True):
            setattr(bwd_module, name, value)
    if not hopper_gemm:  # the round-10 dispatch: the Triton GEMM and its thresholds
        bwd_module.HOPPER_SPARSE_E_MAX = bwd_module.SPARSE_E_MAX
        bwd_module.HOPPER_SPARSE_C_MAX = bwd_module.SPARSE_C_MAX
        matmul_module._hopper_sparse = lambda *args: None

    def plan(*args, **kwargs):
        plans.append(saved(*args, **kwargs))
        return plans[-1]

    bwd_module.skip_plan.plan = plan
    if not summaries:
        function_module.uses_tile_summaries = lambda *args: False
    try:
        yield
    finally:
        for name, value in zip(LIMITS, saved_limits, strict=True):
            setattr(bwd_module, name, value)
        bwd_module.skip_plan.plan = saved
        function_module.uses_tile_summaries = saved_uses
        matmul_module._hopper_sparse = saved_hopper


def sweep_filter(e, c, y) -> list[dict]:
    """Each `FILTER_VARIANTS` entry: time, errors against the fp64 truth, tiles dropped unseen."""
    t_loss, t_de, t_dc = truth(e, c, y)
    rows = []
    for name, (kw, sparse_max, summaries, hopper_gemm) in FILTER_VARIANTS.items():
        plans = []
        with (
            filter_variant(sparse_max, summaries, hopper_gemm, plans),
            failure_noted(rows, name),
        ):
            loss, de, dc = fwd_bwd(vpcce_loss, e, c, y, **kw)
            again = fwd_bwd(vpcce_loss, e, c, y, **kw)
            rows.append(
                {
                    "variant": name,
                    "fwbw_ms": fwbw_ms(e, c, y, **kw),
                    "loss_err": abs(loss.double().item() - t_loss.item()) / abs(t_loss.item()),
                    "de_err": rel(de, t_de),
                    "dc_err": rel(dc, t_dc),
                    "deterministic": all(
                        torch.equal(a, b) for a, b in zip((loss, de, dc), again, strict=True)
                    ),
                    "extra_mb": extra_memory_mb(vpcce_loss, e, c, y, **kw),
                    "planned_skip": plans[0].float().mean().item() if plans else 0.0,
                }
            )
            del loss, de, dc, again
        print(rows[-1], flush=True)
    return rows


def sweep_sizes(sizes, d, v, entropy) -> list[dict]:
    rows = []
    for n in sizes:
        batch = lm_like(n, d, v, entropy=entropy, device="cuda")
        ms = fwbw_ms(batch.e, batch.c, batch.targets)
        gemm = gemm_ms(batch.e, batch.c)
        rows.append({"n": n, "fwbw_ms": ms, "gemm_ms": gemm, "us_per_token": 1e3 * ms / n})
        print(rows[-1], flush=True)
        del batch
        torch.cuda.empty_cache()
    return rows


def profile(e, c, y, **kw) -> list[dict]:
    """GPU milliseconds per kernel name over one forward+backward (after warm-up); ``kw``:
    `linear_cross_entropy` options (default: none)."""
    ec = e.detach().requires_grad_(), c.detach().requires_grad_()
    torch.autograd.grad(vpcce_loss(*ec, y, **kw), ec)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        torch.autograd.grad(vpcce_loss(*ec, y, **kw), ec)
        torch.cuda.synchronize()
    total, calls = defaultdict(float), defaultdict(int)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total[evt.name[:60]] += evt.device_time_total / 1e3
            calls[evt.name[:60]] += 1
    ranked = sorted(total, key=total.get, reverse=True)[:10]
    return [{"kernel": k, "ms": total[k], "calls": calls[k]} for k in ranked]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--v", type=int, default=256000)
    parser.add_argument("--entropy", type=float, default=5.0)
    parser.add_argument(
        "--sort-vocab", action="store_true", help="vocabulary numbered by frequency"
    )
    parser.add_argument(
        "--sections", default="forward,backward", help="forward,backward,filter (or none)"
    )
    parser.add_argument("--sizes", default="", help="other token counts, e.g. 1024,32768")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--profile-filter-eps", type=float, default=None, help="profile this filter (fast: 2^-12)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    batch = lm_like(
        args.n, args.d, args.v, entropy=args.entropy, device="cuda", sort_vocab=args.sort_vocab
    )
    e, c, y = batch.e, batch.c, batch.targets
    out = {
        "shape": [args.n, args.d, args.v],
        "device": torch.cuda.get_device_name(),
        "entropy": batch.mean_entropy,
        "sort_vocab": args.sort_vocab,
        "gemm_ms": gemm_ms(e, c),
    }
    sections = args.sections.split(",")
    if "forward" in sections:
        out["forward"] = sweep_forward(e, c, y)
    if "backward" in sections:
        out["backward"] = sweep_backward(e, c, y)
    if "filter" in sections:
        out["filter"] = sweep_filter(e, c, y)
    if args.profile:
        kw = {} if args.profile_filter_eps is None else {"filter_eps": args.profile_filter_eps}
        out["profile"] = profile(e, c, y, **kw)
        out["profile_filter_eps"] = args.profile_filter_eps
    del batch, e, c, y
    torch.cuda.empty_cache()
    if args.sizes:
        sizes = sorted({args.n, *(int(s) for s in args.sizes.split(","))})
        out["sizes"] = sweep_sizes(sizes, args.d, args.v, args.entropy)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    report(out)


def table(header: list[str], rows: list[dict], cells):
    """A markdown table: ``cells(row)`` gives a row's cells; a failed variant shows its error."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        line = [r["variant"], r["error"]] + [""] * (len(header) - 2) if "error" in r else cells(r)
        print("| " + " | ".join(line) + " |")


def _profiled(out: dict) -> str:
    eps = out.get("profile_filter_eps")
    return "default mode" if eps is None else f"filter_eps {eps:g}"


def report(out: dict):
    n, d, v = out["shape"]
    gemm = out["gemm_ms"]
    sort = ", vocabulary sorted" if out.get("sort_vocab") else ""
    print(f"\n### N {n} x D {d} x V {v}, bf16, {out['device']}, H {out['entropy']:.2f} nats{sort}")
    print(f"cuBLAS GEMM e @ c.T: {gemm:.2f} ms (4 x GEMM = {4 * gemm:.1f} ms)")
    if "forward" in out:
        table(
            ["forward variant", "ms", "x GEMM", "max abs LSE err", "mean LSE err"],
            out["forward"],
            lambda r: [
                r["variant"], f"{r['ms']:.2f}", f"{r['ms'] / gemm:.2f}",
                f"{r['lse_max_abs_err']:.1e}", f"{r['lse_mean_err']:.1e}",
            ],
        )
    if "backward" in out:
        table(
            ["backward variant", "fw+bw ms", "x 4 GEMM", "loss", "dE", "dC", "det", "MB"],
            out["backward"],
            lambda r: [
                r["variant"], f"{r['fwbw_ms']:.1f}", f"{r['fwbw_ms'] / (4 * gemm):.2f}",
                f"{r['loss_err']:.1e}", f"{r['de_err']:.1e}", f"{r['dc_err']:.1e}",
                str(r["deterministic"]), f"{r['extra_mb']:.1f}",
            ],
        )
    if "filter" in out:
        table(
            ["filter variant", "fw+bw ms", "x 4 GEMM", "loss", "dE", "dC", "det", "MB", "unseen"],
            out["filter"],
            lambda r: [
                r["variant"], f"{r['fwbw_ms']:.1f}", f"{r['fwbw_ms'] / (4 * gemm):.2f}",
                f"{r['loss_err']:.1e}", f"{r['de_err']:.1e}", f"{r['dc_err']:.1e}",
                str(r["deterministic"]), f"{r['extra_mb']:.1f}", f"{r['planned_skip']:.2f}",
            ],
        )
    if "profile" in out:
        table(
            [f"kernel (one fw+bw, {_profiled(out)})", "GPU ms", "calls"],
            out["profile"],
            lambda r: [r["kernel"], f"{r['ms']:.2f}", str(r["calls"])],
        )
    if "sizes" in out:
        table(
            ["N", "fw+bw ms", "GEMM ms", "us / token"],
            out["sizes"],
            lambda r: [
                str(r["n"]), f"{r['fwbw_ms']:.1f}", f"{r['gemm_ms']:.2f}",
                f"{r['us_per_token']:.2f}",
            ],
        )

if __name__ == "__main__":
    main()
