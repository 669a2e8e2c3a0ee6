"""`vpcce.launch.comm_profile`: collective time and the part other kernels hide."""

from __future__ import annotations

import pytest
import torch

from vpcce.launch.comm_profile import comm_time, intersection_length, merged, profile_comm


def test_merged_and_intersection():
    assert merged([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    a, b = merged([(0, 10), (20, 30)]), merged([(5, 25), (28, 40)])
    assert intersection_length(a, b) == 5 + 5 + 2
    assert intersection_length(a, []) == 0


def test_comm_time_on_streams():
    events = [
        ("ncclDevKernel_AllGather_RING_LL", 100, 200),
        ("ncclKernel_AllReduce", 150, 260),  # overlaps the other collective: counted once
        ("_cce_dlogits_kernel", 0, 120),  # hides 20 ns of the first
        ("nvjet_gemm", 240, 300),  # and 20 ns of the second
        ("gloo:all_reduce", 400, 450),  # a host-side collective range
    ]
    t = comm_time(events, overlap=True)
    assert t.comm_ms == pytest.approx((160 + 50) / 1e6)
    assert t.overlapped_ms == pytest.approx(40 / 1e6)
    assert comm_time(events, overlap=False).overlapped_ms is None


def test_profile_comm_without_collectives_on_cpu():
    t = profile_comm(lambda: torch.randn(64, 64) @ torch.randn(64, 64), torch.device("cpu"))
    assert t.comm_ms == 0 and t.overlapped_ms is None
