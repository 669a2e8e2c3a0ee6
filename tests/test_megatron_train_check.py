"""`vpcce.launch.megatron_train_check` (the H100 round's script) on CPU with tiny sizes: both runs
train, start from the same weights, report a table and JSON, and their losses agree (fp32).

One spawned rank per megatron-core install (see tests/test_megatron.py), with the CPU stand-ins
of tests/megatron_ranks.py.
"""

from __future__ import annotations

import json

import pytest
from multiproc import run_ranks
from test_megatron import _installs

TINY = ["--device", "cpu", "--steps", "3", "--seq-len", "16", "--micro-batch", "2",
        "--vocab", "384", "--hidden", "32", "--layers", "2", "--heads", "4", "--lr", "1e-2"]


def _run_check(rank, world, megatron_path, runs):
    import contextlib
    import io
    import sys

    if megatron_path is not None:
        sys.path.insert(0, megatron_path)
    import megatron_ranks

    megatron_ranks._quiet()
    megatron_ranks._cpu_stand_ins()
    from vpcce.launch import megatron_train_check

    results = []
    for argv in runs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = megatron_train_check.main(argv)
        results.append((code, out.getvalue()))
    return results


@pytest.mark.parametrize("megatron_path", _installs())
def test_train_check_runs_and_agrees_on_cpu(megatron_path, tmp_path):
    outs = [tmp_path / "tied.json", tmp_path / "untied.json"]
    runs = [[*TINY, "--out", str(outs[0])], [*TINY, "--out", str(outs[1]), "--untied"]]
    results = run_ranks(_run_check, 1, megatron_path, runs, timeout=300)[0]
    for (code, text), out in zip(results, outs, strict=True):
        assert code == 0, text
        assert "max per-step relative loss difference" in text and "OK" in text, text
        record = json.loads(out.read_text())
        m, v = record["runs"]["megatron"], record["runs"]["vpcce"]
        assert len(m["losses"]) == len(v["losses"]) == 3
        assert record["max_rel_diff"] <= 1e-5, text  # fp32: the same training up to rounding
        assert m["losses"][-1] < m["losses"][0], text  # it learns
