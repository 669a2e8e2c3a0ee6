"""`vpcce.launch.check` under ``torchrun --standalone --nproc_per_node 2`` on gloo (CPU): every
rank passes, and the checker's self-test (``--inject-error``) makes the chosen rank fail."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from multiproc import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def torchrun_check(*args: str) -> subprocess.CompletedProcess:
    return run_torchrun("vpcce.launch.check", "--backend", "gloo", *args, timeout=TIMEOUT_S)


def _lines(proc) -> list[str]:
    return proc.stdout.splitlines()


@pytest.mark.parametrize(
    "args, shards",
    [
        (("--impl", "torch"), "[516, 515]"),  # the default V = 1031
        # fp64: the hidden gradient is summed in fp64 too (bound 1e-12)
        (("--impl", "torch", "--dtype", "fp64"), "[516, 515]"),
        # the Triton kernels in the CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
        # a smaller vocabulary, still prime, keeps the interpreter to seconds
        (("--impl", "triton", "--dtype", "bf16", "--vocab", "257"), "[129, 128]"),
    ],
    ids=["torch-fp32", "torch-fp64", "triton-bf16"],
)
def test_two_ranks_pass(args, shards):
    proc = torchrun_check(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = _lines(proc)
    assert "rank 0: PASS" in lines and "rank 1: PASS" in lines, proc.stdout
    assert lines[-1] == "PASS: all 2 ranks"
    assert "world 2, backend gloo" in lines[0] and f"shard rows {shards}" in lines[0]


def test_injected_error_fails_that_rank():
    proc = torchrun_check("--impl", "torch", "--inject-error", "1")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = _lines(proc)
    assert "rank 0: PASS" in lines, proc.stdout
    (fail,) = [line for line in lines if line.startswith("rank 1: FAIL (")]
    assert "dC: 1.0e-01 > tol" in fail
    assert "FAIL: ranks [1]" in lines
