"""Kernel-level A/B timing: ops timed in turn, each as a run of back-to-back launches.

The kernels' rounds in docs/perf.md compare variants of one kernel on one chunk (the dlogits
kernel's inputs: `dlogits_inputs`), with the cuBLAS GEMM of the same shape as the yardstick. A
forward + backward moves by +-3% between runs of the same code on an H200 (the GPU's clocks
follow its power state). One kernel, launched ``launches`` times per timing and timed in turn
with the others within every repetition, moved by 0.5-2% between two machines' runs of the same
kernel (round 29). The scripts in docs/patches call `in_turn`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from vpcce.launch.data import lm_like
from vpcce.launch.sweep import fp64_lse


def in_turn(
    ops: dict[str, Callable[[], object]],
    *,
    reps: int = 12,
    launches: int = 8,
    warmup: int = 3,
    device: torch.device | str = "cuda",
) -> dict[str, list[float]]:
    """Per repetition, each op's ms per launch: every repetition times the ops one after another,
    each as ``launches`` calls back to back (CUDA events; ``perf_counter`` off CUDA). ``warmup``
    calls of each op first (compiles, caches)."""
    cuda = torch.device(device).type == "cuda"
    for op in ops.values():
        for _ in range(warmup):
            op()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(reps):
        for name, op in ops.items():
            times[name].append(_ms_per_launch(op, launches, cuda))
    return times


def _ms_per_launch(op: Callable[[], object], launches: int, cuda: bool) -> float:
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(launches):
            op()
        return (time.perf_counter() - t0) * 1e3 / launches
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        op()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / launches


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of each op's per-repetition times."""
    return {name: statistics.median(ms) for name, ms in times.items()}


def table(times: dict[str, list[float]], against: str, label: str = "kernel") -> str:
    """A markdown table of each op's median, its ratio to ``against``'s and its range."""
    med = medians(times)
    rows = [f"| {label} | median ms | / {against} | min | max |", "|---|---|---|---|---|"]
    for name, ms in times.items():
        ratio = med[name] / med[against]
        rows.append(f"| {name} | {med[name]:.3f} | {ratio:.3f} | {min(ms):.3f} | {max(ms):.3f} |")
    return "\n".join(rows)


def dlogits_inputs(n: int, d: int, v: int, *, entropy: float = 5.0, device="cuda") -> dict:
    """The exact backward's dlogits inputs on LM-like bf16 data, by the names of
    `vpcce.kernels.backward_hopper.launcher`'s arguments: ``e2 [N, D]``, ``c [V, D]``,
    ``y2 [1, N]``, the LSE (from fp64 logits, in fp32), a mean reduction's upstream
    gradient ``g_nll``, no ``g_lse``, and a zero ``dz_target``."""
    batch = lm_like(n, d, v, entropy=entropy, dtype=torch.bfloat16, device=device)
    return {
        "e2": batch.e,
        "c": batch.c,
        "y2": batch.targets.reshape(1, n),
        "lse": fp64_lse(batch.e, batch.c).float(),
        "g_nll": torch.full((n,), 1.0 / n, device=device),
        "g_lse": None,
        "dz_target": torch.zeros(n, device=device),
    }
