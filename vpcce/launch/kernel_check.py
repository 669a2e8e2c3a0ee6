"""GPU acceptance round for the kernels: accuracy vs an fp64 truth, determinism, memory, sync, time.

    python -m vpcce.launch.kernel_check --n 8192 --d 2304 --v 256000 --json out.json

For each data set (LM-like peaked, flat random) it measures, in one run: the fp64 truth (chunked
materialized softmax on the same bf16 inputs), the materialized bf16 baseline
``F.cross_entropy((e @ c.T).float(), y)``, vpcce exact and default; errors are
``||x - truth|| / ||truth||``. Then determinism (two runs bitwise), extra memory beyond dE and dC,
host synchronization (``torch.cuda.set_sync_debug_mode("error")``) and median times next to the
cuBLAS GEMM ``e @ c.T`` of the same shape. Markdown tables are printed last, with checksums of
the inputs and of the default's loss, dE and dC: equal in two runs (processes) when both the
data and the kernels are deterministic.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from vpcce import linear_cross_entropy
from vpcce.launch.data import flat, lm_like

MODES = {"exact": {"impl": "cce_exact"}, "default": {}}


def truth(e, c, y, chunk: int = 512):
    """fp64 mean loss and gradients (dE, dC), materializing ``[chunk, V]`` fp64 logits at a time."""
    e64, c64 = e.double(), c.double()
    n = e.shape[0]
    loss = torch.zeros((), dtype=torch.float64, device=e.device)
    de = torch.empty_like(e64)
    dc = torch.zeros_like(c64)
    for n0 in range(0, n, chunk):
        z = e64[n0 : n0 + chunk] @ c64.T
        lse = torch.logsumexp(z, dim=1)
        rows = torch.arange(z.shape[0], device=e.device)
        loss += (lse - z[rows, y[n0 : n0 + chunk]]).sum()
        dz = torch.exp(z - lse[:, None])
        dz[rows, y[n0 : n0 + chunk]] -= 1.0
        dz /= n
        de[n0 : n0 + chunk] = dz @ c64
        dc += dz.T @ e64[n0 : n0 + chunk]
        del z, dz
    return loss / n, de, dc


def checksum(t: torch.Tensor) -> str:
    """A hex digest of ``t``'s bits: the sum, mod 2^64, of its 8/16/32/64-bit words times their
    positions mod a prime (< 2^20), so a change of one word in its low 44 bits always changes it."""
    words = t.detach().reshape(-1)
    words = words.view(
        {1: torch.int8, 2: torch.int16, 4: torch.int32}.get(words.element_size(), torch.int64)
    )
    weights = torch.arange(1, words.numel() + 1, device=words.device) % 1_000_003
    return f"{int((words.long() * weights).sum()) % 2**64:016x}"


def rel(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def baseline(e, c, y):
    return F.cross_entropy((e @ c.T).float(), y)


def vpcce_loss(e, c, y, **kw):
    return linear_cross_entropy(e, c, y, **kw)


def fwd_bwd(fn, e, c, y, **kw):
    e = e.detach().requires_grad_()
    c = c.detach().requires_grad_()
    loss = fn(e, c, y, **kw)
    de, dc = torch.autograd.grad(loss, (e, c))
    return loss.detach(), de, dc


def extra_memory_mb(fn, e, c, y, **kw) -> float:
    """Peak allocated during forward+backward minus inputs, dE and dC (they are the outputs)."""
    e = e.detach().requires_grad_()
    c = c.detach().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fn(e, c, y, **kw)
    de, dc = torch.autograd.grad(loss, (e, c))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    return (peak - de.numel() * de.element_size() - dc.numel() * dc.element_size()) / 2**20


def no_host_sync(e, c, y, **kw) -> bool:
    e = e.detach().requires_grad_()
    c = c.detach().requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = vpcce_loss(e, c, y, **kw)
        torch.autograd.grad(loss, (e, c))
        return True
    except RuntimeError as err:
        print(f"host synchronization: {err}")
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check(name, batch, args) -> dict:
    e, c, y = batch.e, batch.c, batch.targets
    row = {"data": name, "entropy": batch.mean_entropy, "nll": batch.mean_nll}
    t_loss, t_de, t_dc = truth(e, c, y)
    runs = {"baseline": fwd_bwd(baseline, e, c, y)}
    for mode, kw in MODES.items():
        runs[mode] = fwd_bwd(vpcce_loss, e, c, y, **kw)
    for label, (loss, de, dc) in runs.items():
        row[label] = {
            "loss_err": abs(loss.double().item() - t_loss.item()) / abs(t_loss.item()),
            "de_err": rel(de, t_de),
            "dc_err": rel(dc, t_dc),
        }
    del t_de, t_dc
    again = fwd_bwd(vpcce_loss, e, c, y, **MODES["default"])
    first = runs["default"]
    row["bitwise_deterministic"] = all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    row["checksums"] = {
        "e, c, y": " ".join(checksum(t) for t in (e, c, y)),
        "default loss, dE, dC": " ".join(checksum(t) for t in first),
    }
    del runs, again, first
    row["no_host_sync"] = no_host_sync(e, c, y)
    for mode, kw in MODES.items():
        row[f"{mode}_extra_mb"] = extra_memory_mb(vpcce_loss, e, c, y, **kw)
    if args.time:
        row["ms"] = timings(e, c, y)
    return row


def timings(e, c, y) -> dict:
    ec = e.detach().requires_grad_(), c.detach().requires_grad_()

    def step(fn, **kw):
        return lambda: torch.autograd.grad(fn(*ec, y, **kw), ec)

    out = {"gemm": do_bench(lambda: e @ c.T, warmup=50, rep=300, return_mode="median")}
    with torch.no_grad():
        out["fw"] = do_bench(lambda: vpcce_loss(e, c, y), warmup=50, rep=300, return_mode="median")
    for mode, kw in MODES.items():
        out[f"fwbw_{mode}"] = do_bench(
            step(vpcce_loss, **kw), warmup=50, rep=500, return_mode="median"
        )
    out["fwbw_baseline"] = do_bench(step(baseline), warmup=50, rep=500, return_mode="median")
    return out


def report(rows: list[dict], shape: tuple[int, int, int], device: str) -> None:
    """The markdown tables of `check`'s rows."""
    n, d, v = shape
    print(f"\n### N {n} x D {d} x V {v}, bf16, {device}")
    print("| data | H / NLL | method | loss err | dE err | dC err |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for label in ("baseline", *MODES):
            m = r[label]
            errors = f"{m['loss_err']:.1e} | {m['de_err']:.1e} | {m['dc_err']:.1e}"
            print(f"| {r['data']} | {r['entropy']:.2f} / {r['nll']:.2f} | {label} | {errors} |")
    times = ("gemm", "fw", "fwbw_exact", "fwbw_default", "fwbw_baseline")
    print(
        "\n| data | deterministic | no host sync | extra MB exact | extra MB default | gemm ms "
        "| fw ms | fw+bw exact | fw+bw default | fw+bw baseline |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r.get("ms", {})
        cells = [f"{ms[k]:.2f}" if k in ms else "-" for k in times]
        print(
            f"| {r['data']} | {r['bitwise_deterministic']} | {r['no_host_sync']} "
            f"| {r['exact_extra_mb']:.1f} | {r['default_extra_mb']:.1f} | {' | '.join(cells)} |"
        )
    print("\n| data | checksums of | |\n|---|---|---|")
    for r in rows:
        for what, digest in r["checksums"].items():
            print(f"| {r['data']} | {what} | {digest} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--v", type=int, default=256000)
    parser.add_argument(
        "--entropy", type=float, default=5.0, help="mean entropy of the peaked data"
    )
    parser.add_argument("--no-time", dest="time", action="store_false")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    batches = {
        f"peaked~{args.entropy:g}": lambda: lm_like(
            args.n, args.d, args.v, entropy=args.entropy, device=dev
        ),
        "flat": lambda: flat(args.n, args.d, args.v, device=dev),
    }
    for name, make in batches.items():
        rows.append(check(name, make(), args))
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "shape": [args.n, args.d, args.v],
                    "device": torch.cuda.get_device_name(),
                    "rows": rows,
                },
                f,
                indent=1,
            )
    report(rows, (args.n, args.d, args.v), torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
