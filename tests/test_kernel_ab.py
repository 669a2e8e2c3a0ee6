"""`vpcce.launch.kernel_ab` on the CPU: ops timed in turn, runs of launches, the dlogits inputs."""

import torch

from vpcce.launch import kernel_ab


def test_every_repetition_times_each_op_in_turn():
    calls = []
    ops = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "gemm")}
    times = kernel_ab.in_turn(ops, reps=3, launches=4, warmup=2, device="cpu")
    assert calls[:6] == ["a"] * 2 + ["b"] * 2 + ["gemm"] * 2  # warm-up, op by op
    assert calls[6:] == (["a"] * 4 + ["b"] * 4 + ["gemm"] * 4) * 3  # then in turn, 4 launches
    assert {name: len(ms) for name, ms in times.items()} == {"a": 3, "b": 3, "gemm": 3}
    assert all(ms > 0 for per_rep in times.values() for ms in per_rep)


def test_medians_and_table():
    times = {"new": [3.0, 1.0, 2.0], "gemm": [2.0, 4.0, 3.0]}
    assert kernel_ab.medians(times) == {"new": 2.0, "gemm": 3.0}
    lines = kernel_ab.table(times, "gemm").splitlines()
    assert lines[0] == "| kernel | median ms | / gemm | min | max |"
    assert lines[2] == "| new | 2.000 | 0.667 | 1.000 | 3.000 |"
    assert lines[3] == "| gemm | 3.000 | 1.000 | 2.000 | 4.000 |"


def test_dlogits_inputs():
    n, d, v = 96, 32, 500
    x = kernel_ab.dlogits_inputs(n, d, v, device="cpu")
    assert list(x) == ["e2", "c", "y2", "lse", "g_nll", "g_lse", "dz_target"]  # launcher's order
    assert x["e2"].shape == (n, d) and x["c"].shape == (v, d) and x["y2"].shape == (1, n)
    logits = x["e2"].double() @ x["c"].double().T
    torch.testing.assert_close(x["lse"].double(), torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(x["g_nll"], torch.full((n,), 1.0 / n))
    assert x["g_lse"] is None and not x["dz_target"].any()
