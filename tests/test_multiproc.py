"""Smoke tests of the multi-process harness `multiproc.run_ranks` (three spawns of two ranks)."""

import time

import pytest
import torch
import torch.distributed as dist
from multiproc import RankError, run_ranks


def _all_reduce_rank(rank, world_size, base):
    x = torch.tensor([base + rank], dtype=torch.float64)
    dist.all_reduce(x)
    return {
        "rank": rank,
        "world": dist.get_world_size(),
        "sum": x,
        "threads": torch.get_num_threads(),
    }


def _raising_rank(rank, world_size):
    if rank == 1:
        _fail_on_purpose(rank)
    return rank


def _fail_on_purpose(rank):
    raise ValueError(f"deliberate failure on rank {rank}")


def _sleeping_rank(rank, world_size):
    if rank == 0:
        time.sleep(600)
    return rank


def test_all_reduce_sums_over_ranks():
    results = run_ranks(_all_reduce_rank, 2, 10.0, timeout=60)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world"] == 2
        assert r["threads"] == 1
        assert torch.equal(r["sum"], torch.tensor([21.0], dtype=torch.float64))


def test_failing_rank_is_reraised_with_its_traceback():
    with pytest.raises(RankError, match="rank 1 of 2 failed") as info:
        run_ranks(_raising_rank, 2, timeout=60)
    message = str(info.value)
    assert "Traceback" in message and "_fail_on_purpose" in message
    assert "ValueError: deliberate failure on rank 1" in message
    assert info.value.rank == 1
    assert isinstance(info.value.original, ValueError)
    assert isinstance(info.value.__cause__, ValueError)


def test_hanging_rank_times_out():
    # the deadline counts from the spawn: 20 s leaves rank 1 time to start and finish on a loaded
    # 2-core machine (6 s did not, once, with other jobs running: both ranks were reported)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 2 did not finish"):
        run_ranks(_sleeping_rank, 2, timeout=20)
    assert time.monotonic() - t0 < 40
