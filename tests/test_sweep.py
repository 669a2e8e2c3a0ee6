"""The tuning launcher's CPU-side pieces (`vpcce.launch.sweep`): its GPU timings are recorded in
docs/perf.md, not asserted here."""

from __future__ import annotations

from dataclasses import replace

import pytest
from triton.runtime.errors import OutOfResources

from vpcce.kernels import common, grad_e
from vpcce.launch import sweep


def tables():
    return common.GPU_FORWARD_BLOCKS, common.GPU_BLOCKS, grad_e.MAX_RECOMPUTE


def test_variant_swaps_and_restores_the_tables():
    saved = tables()
    fwd, bwd = replace(saved[0], n=16), replace(saved[1], v=32)
    with pytest.raises(RuntimeError), sweep.variant(fwd, bwd, 0.0):
        swapped = tables()
        raise RuntimeError("a variant failed")
    assert swapped == (fwd, bwd, 0.0)
    assert tables() == saved


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
