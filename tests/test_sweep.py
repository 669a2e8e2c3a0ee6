"""The tuning launcher's CPU-side pieces (`vpcce.launch.sweep`): its GPU timings are recorded in
docs/perf.md, not asserted here."""

from __future__ import annotations

from dataclasses import replace

import pytest
from triton.runtime.errors import OutOfResources

from vpcce.kernels import common, grad_e
from vpcce.launch import sweep


def tables():
    scratch = grad_e.MAX_RECOMPUTE, grad_e.NARROW_PRODUCT
    return common.GPU_FORWARD_BLOCKS, common.GPU_BLOCKS, scratch


def hopper_tables():
    return common.HOPPER_FORWARD_BLOCKS, common.HOPPER_BACKWARD_BLOCKS


def test_variant_swaps_and_restores_the_tables():
    saved = tables()
    fwd, bwd = replace(saved[0], n=16), replace(saved[1], v=32)
    scratch = {"MAX_RECOMPUTE": 0.0, "NARROW_PRODUCT": 0}
    with pytest.raises(RuntimeError), sweep.variant(fwd, bwd, scratch):
        swapped = tables()
        raise RuntimeError("a variant failed")
    assert swapped == (fwd, bwd, (0.0, 0))
    assert tables() == saved


def test_variant_turns_the_hopper_kernels_off_and_back():
    saved = hopper_tables()
    with pytest.raises(RuntimeError), sweep.variant(hopper=None, hopper_backward=None):
        off = hopper_tables()
        raise RuntimeError("a variant failed")
    assert off == (None, None)
    assert hopper_tables() == saved


def test_failed_variant_becomes_a_row(capsys):
    rows = []
    with sweep.failure_noted(rows, "too big"):
        raise OutOfResources(300000, 232448, "shared memory")
    assert rows[0]["variant"] == "too big" and rows[0]["error"].startswith("OutOfResources")
    ok = {"variant": "fine", "ms": 2.0, "lse_max_abs_err": 1e-6, "lse_mean_err": -1e-7}
    sweep.report(
        {"shape": [8, 4, 16], "device": "cpu", "entropy": 5.0, "gemm_ms": 1.0,
         "forward": [ok, *rows]}
    )
    lines = capsys.readouterr().out.splitlines()
    assert "| fine | 2.00 | 2.00 | 1.0e-06 | -1.0e-07 |" in lines
    assert any(line.startswith("| too big | OutOfResources") for line in lines)


def test_filter_variant_swaps_dispatch_and_summaries_and_records_plans(capsys):
    import torch

    import vpcce.function as function_module

    bwd = sweep.bwd_module
    uses = function_module.uses_tile_summaries
    limits = [getattr(bwd, name) for name in sweep.LIMITS]
    saved = bwd.skip_plan.plan, uses, sweep.matmul_module._hopper_sparse
    plans = []
    with sweep.filter_variant((1.0, 0.5), False, True, plans):
        assert [getattr(bwd, name) for name in sweep.LIMITS] == [1.0, 0.5, 1.0, 0.5]
        assert function_module.uses_tile_summaries("triton", None, None, False, 1, 1) is False
        bounds = torch.tensor([[-20.0, 0.0]])
        got = bwd.skip_plan.plan(
            bounds, torch.tensor([300]), vocab_start=0, vocab=512, block_n=128, block_v=256,
            uniform_weight=0.0, filter_eps=1e-3,
        )  # fmt: skip
    assert torch.equal(got, torch.tensor([[1, 0]], dtype=torch.int8)) and plans == [got]
    with sweep.filter_variant(None, True, False, []):  # round 10: the Triton GEMM, its limits
        assert bwd.HOPPER_SPARSE_E_MAX == bwd.SPARSE_E_MAX
        assert sweep.matmul_module._hopper_sparse() is None
    assert [getattr(bwd, name) for name in sweep.LIMITS] == limits
    assert (bwd.skip_plan.plan, function_module.uses_tile_summaries) == saved[:2]
    assert sweep.matmul_module._hopper_sparse is saved[2]
    row = {"variant": "2^-12", "fwbw_ms": 40.0, "loss_err": 1e-6, "de_err": 0.4, "dc_err": 5e-3,
           "deterministic": True, "extra_mb": 58.0, "planned_skip": 0.84}  # fmt: skip
    sweep.report({"shape": [8, 4, 16], "device": "cpu", "entropy": 5.0, "gemm_ms": 10.0,
                  "sort_vocab": True, "filter": [row]})  # fmt: skip
    out = capsys.readouterr().out
    assert "vocabulary sorted" in out
    assert "| 2^-12 | 40.0 | 1.00 | 1.0e-06 | 4.0e-01 | 5.0e-03 | True | 58.0 | 0.84 |" in out
