"""Time a call spends in collectives, and how much of it other GPU work hides (torch.profiler).

- CUDA: the device events of the call (one profiled run); collectives are the NCCL kernels.
  ``comm_ms`` is the length of the union of their intervals, ``overlapped_ms`` the part of it
  during which other GPU work (a kernel, a copy) also ran on another stream: communication that
  costs no wall time.
- CPU (gloo): the profiler's ``gloo:*`` ranges. They run on gloo's worker threads, where host ops
  of the caller's thread do not tell what overlaps them: ``overlapped_ms`` is None (not measured).

Both count the wait for the other ranks inside a collective (an NCCL kernel spins until its peers
arrive), and come from one profiled call: a single sample, not a median.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


@dataclass
class CommTime:
    comm_ms: float
    overlapped_ms: float | None


def is_collective(name: str) -> bool:
    return "nccl" in name.lower() or name.startswith("gloo:")


def merged(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping intervals covering the same points."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersection_length(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Total length shared by two `merged` interval lists."""
    total, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def comm_time(events: Iterable[tuple[str, int, int]], overlap: bool) -> CommTime:
    """``events``: (name, start ns, end ns) of one device's work; see the module docstring."""
    events = list(events)
    comm = merged((s, e) for name, s, e in events if is_collective(name))
    comm_ns = sum(e - s for s, e in comm)
    if not overlap:
        return CommTime(comm_ns / 1e6, None)
    other = merged((s, e) for name, s, e in events if not is_collective(name))
    return CommTime(comm_ns / 1e6, intersection_length(comm, other) / 1e6)


def profile_comm(fn: Callable[[], object], device: torch.device) -> CommTime:
    """`comm_time` of one call of ``fn`` on ``device`` (CUDA: synchronized before and after)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = (
        (ev.name(), ev.start_ns(), ev.start_ns() + ev.duration_ns())
        for ev in prof.profiler.kineto_results.events()
        if ev.device_type() == kind
    )
    return comm_time(events, overlap=cuda)
