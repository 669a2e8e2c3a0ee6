"""vpcce against the GEMM floor, timed in turn within every repetition.

    python -m vpcce.launch.ratio --n 16384 --d 4096 --v 128256 --entropies 1,5,12 --reps 20

Under load an H100 runs at its 700 W cap and its clocks follow the power state, so the ratio
of two times depends on when each was taken (docs/perf.md round 18). `vpcce.launch.bench` times
each op over its own run of repetitions, the GEMM first; here every repetition times, back to
back, the GEMM ``e @ c.T``, vpcce's forward (inputs requiring grad) and its forward+backward,
each with CUDA events (``perf_counter`` on the CPU), and takes the median over repetitions of
the ratios fw / GEMM and fw+bw / 4 GEMM. Neither is the ratio at one fixed clock: a GEMM timed
right after a fw+bw ran up to 8% faster than in the bench's own run of GEMMs (Llama head).
So every repetition also times four GEMMs back to back (``4gemm``), the 8NVD floor run for as
long as a fw+bw runs, and reports fw+bw / 4gemm beside fw+bw / 4 GEMM. ``--idle-ms`` lets the GPU
idle that long before each timed op, so that each starts from the same power state rather than
from what ran before it (the op after four GEMMs runs slower than the op after one). After an
idle GPU the host has no lead: the time between the start event and each of the op's launches
counts too, which a one-launch GEMM barely pays and a many-launch forward+backward does.
``--lead-ms`` queues a spin of one GPU thread (``torch.cuda._sleep``, next to no power) that long
before each timed op, so the op's launches are queued behind it, as in training, where the host
runs ahead of the GPU. The host's own time per op (its launches, and any wait inside) is kept
as ``host_ms``.

Options are `linear_cross_entropy`'s (``--impl``, ``--filter-eps``, ``--accum-e-fp32``).
``--against none`` also times the fw+bw of that ``filter_eps`` (the other options the same) in
every repetition, before or after the other in turn, and reports the median of the
per-repetition differences (e.g. the default against the exact backward: issue 9's "never
slower than exact", where two runs of one op differ by ~1 ms at 60 ms).
Data: LM-like peaked logits (`vpcce.launch.data.lm_like`). A markdown table is printed last;
``--json`` keeps every repetition's times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vpcce import linear_cross_entropy
from vpcce.launch.data import lm_like


def _timer(device: torch.device):
    """``time(fn) -> (ms getter, host ms)``: CUDA events read after one synchronize, or wall
    time; the host ms is the wall time of the call itself (its launches, and any wait)."""
    if device.type != "cuda":

        def wall(fn):
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            return (lambda: ms), ms

        return wall

    def events(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3
        end.record()
        return (lambda: start.elapsed_time(end)), host_ms

    return events


def _spinner(device: torch.device, ms: float):
    """``spin()``: queue ~``ms`` of one spinning GPU thread (CPU, or 0 ms: nothing). Its cycles
    per ms are measured once, at the clocks of the moment."""
    if device.type != "cuda" or ms <= 0:
        return lambda: None
    cycles = 10**6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # the first call loads the kernel
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    per_ms = cycles / start.elapsed_time(end)
    return lambda: torch.cuda._sleep(int(ms * per_ms))


_NOT_TIMED = object()


def measure(
    e,
    c,
    y,
    *,
    reps: int,
    warmup: int = 3,
    against=_NOT_TIMED,
    idle_ms: float = 0.0,
    lead_ms: float = 0.0,
    **options,
) -> dict:
    """Per-repetition times (ms) of the GEMM, four GEMMs, vpcce's fw and fw+bw, in turn; the
    medians of the per-repetition ratios. ``against``: a ``filter_eps`` whose fw+bw is timed
    too, and the median of the per-repetition differences ``fw+bw - against``. ``idle_ms``: the
    GPU waits that long, idle, before each timed op; ``lead_ms``: then spins that long, so the
    op's launches queue behind the spin (``host_ms``: the host's time per op)."""
    e_, c_ = e.detach().requires_grad_(), c.detach().requires_grad_()

    def fw_bw(**opts):
        return lambda: torch.autograd.grad(linear_cross_entropy(e_, c_, y, **opts), (e_, c_))

    def four_gemms():  # one [N, V] output alive at a time, as in a single GEMM
        for _ in range(4):
            out = e @ c.T
        return out

    ops = {
        "gemm": lambda: e @ c.T,
        "4gemm": four_gemms,
        "fw": lambda: linear_cross_entropy(e_, c_, y, **options),
        "fw+bw": fw_bw(**options),
    }
    if against is not _NOT_TIMED:
        ops["against"] = fw_bw(**{**options, "filter_eps": against})
    for _ in range(warmup):
        for op in ops.values():
            op()
    time_, spin = _timer(e.device), _spinner(e.device, lead_ms)
    pending = {name: [] for name in ops}
    host = {name: [] for name in ops}
    names = list(ops)
    for rep in range(reps):
        # fw+bw and ``against`` swap places every other repetition: the second of two back-to-back
        # runs is faster (H200, Llama head: the same exact backward twice differed by +4.8 ms)
        order = names if rep % 2 == 0 or "against" not in ops else [*names[:-2], *names[:-3:-1]]
        for name in order:
            if idle_ms:
                if e.device.type == "cuda":
                    torch.cuda.synchronize(e.device)
                time.sleep(idle_ms / 1e3)
            spin()
            get, host_ms = time_(ops[name])
            pending[name].append(get)
            host[name].append(host_ms)
    if e.device.type == "cuda":
        torch.cuda.synchronize(e.device)
    ms = {name: [get() for get in got] for name, got in pending.items()}
    ratio = {
        "fw": statistics.median(f / g for f, g in zip(ms["fw"], ms["gemm"], strict=True)),
        "fw+bw": statistics.median(
            f / (4 * g) for f, g in zip(ms["fw+bw"], ms["gemm"], strict=True)
        ),
        "fw+bw/4gemm": statistics.median(
            f / g for f, g in zip(ms["fw+bw"], ms["4gemm"], strict=True)
        ),
    }
    out = {
        "ms": ms,
        "median_ms": {k: statistics.median(v) for k, v in ms.items()},
        "ratio": ratio,
        "host_ms": host,
        "median_host_ms": {k: statistics.median(v) for k, v in host.items()},
    }
    if "against" in ms:
        pairs = zip(ms["fw+bw"], ms["against"], strict=True)
        out["difference_ms"] = statistics.median(a - b for a, b in pairs)
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--v", type=int, default=256000)
    parser.add_argument("--entropies", default="5", help="mean entropies in nats, e.g. 1,5,12")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--filter-eps", default="auto", help='"auto", "tail", "none" or a float')
    parser.add_argument("--against", default=None, help="a --filter-eps to time fw+bw against")
    parser.add_argument("--idle-ms", type=float, default=0.0, help="idle GPU before each op")
    parser.add_argument(
        "--lead-ms", type=float, default=0.0, help="then a GPU spin (the host lead)"
    )
    parser.add_argument(
        "--accum-e-fp32", action="store_true", help="dE accumulates in a separate fp32 buffer"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    eps = _filter_eps(args.filter_eps)
    against = {} if args.against is None else {"against": _filter_eps(args.against)}
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    for entropy in (float(x) for x in args.entropies.split(",")):
        batch = lm_like(args.n, args.d, args.v, entropy=entropy, dtype=dtype, device=args.device)
        got = measure(
            batch.e, batch.c, batch.targets, reps=args.reps, impl=args.impl, filter_eps=eps,
            accum_e_fp32=args.accum_e_fp32, idle_ms=args.idle_ms, lead_ms=args.lead_ms, **against,
        )  # fmt: skip
        rows.append(dict(n=args.n, d=args.d, v=args.v, entropy=entropy, **got))
        del batch
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    extra = "" if args.against is None else f" {args.against} fw+bw ms | difference ms |"
    print(
        "| N × D × V | entropy | GEMM ms | 4 GEMMs ms | fw ms | fw+bw ms | fw / GEMM "
        "| fw+bw / 4 GEMM | fw+bw / 4 GEMMs | fw host ms | fw+bw host ms |" + extra
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * extra.count("|"))
    for r in rows:
        t, q, h = r["median_ms"], r["ratio"], r["median_host_ms"]
        more = "" if not extra else f" {t['against']:.2f} | {r['difference_ms']:+.2f} |"
        print(
            f"| {r['n']} × {r['d']} × {r['v']} | {r['entropy']:g} | {t['gemm']:.2f} | "
            f"{t['4gemm']:.2f} | {t['fw']:.2f} | {t['fw+bw']:.2f} | {q['fw']:.3f} | "
            f"{q['fw+bw']:.3f} | {q['fw+bw/4gemm']:.3f} | {h['fw']:.2f} | {h['fw+bw']:.2f} |" + more
        )
    return rows


def _filter_eps(text: str):
    """A command line's ``filter_eps``: "auto", "tail", "none" (None) or a float."""
    named = {"auto": "auto", "tail": "tail", "none": None}
    return named[text.lower()] if text.lower() in named else float(text)


if __name__ == "__main__":
    main()
