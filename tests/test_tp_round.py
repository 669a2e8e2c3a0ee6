"""`vpcce.launch.tp_round` on CPU: gloo, 2 ranks, the tiny configs, every part."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from vpcce.launch import tp_round

ROOT = Path(__file__).resolve().parents[1]


def _megatron_on_path(monkeypatch) -> None:
    """The scaling part compares with Megatron's loss: the newest CI copy, or an installed one."""
    copies = sorted(ROOT.glob(".megatron/*/megatron/core"))
    if copies:
        path = str(copies[-1].parents[1])
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]))
    else:
        pytest.importorskip("megatron.core")


@pytest.mark.slow
def test_cpu_round(tmp_path, capsys, monkeypatch):
    _megatron_on_path(monkeypatch)
    code = tp_round.main(["--cpu", "--worlds", "2", "--train-steps", "2", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "tp_round.json").read_text())
    assert code == 0, summary
    (chk,) = summary["check"]
    assert chk["passed"] and chk["ranks"] == ["rank 0: PASS", "rank 1: PASS"]
    (train,) = summary["train"]
    assert train["exit"] == 0 and train["max_rel_loss_diff"] <= 1e-3
    assert train["vpcce_loss_op_peak_mib"] < train["materialized_loss_op_peak_mib"]
    rows = summary["scaling"]
    # cpu_tiny: N 64 and 128; both methods at world 1 and 2
    assert {(r["method"], r["n"], r["world"]) for r in rows} == {
        (m, n, w) for m in tp_round.BENCH_METHODS for n in (64, 128) for w in (1, 2)
    }
    for r in rows:
        assert r["status"] == "ok" and r["ms"]["fw+bw"] > 0, r
        assert r["efficiency"] == pytest.approx(1.0) if r["world"] == 1 else r["efficiency"] > 0
        # collectives are timed where there are some (gloo: nothing overlapped)
        assert (r["comm"] is None) == (r["world"] == 1), r
        if r["world"] > 1:
            assert r["comm"]["ms"] > 0 and r["comm"]["overlapped_ms"] is None
    assert "| 2 | fp32 | PASS (exit 0) |" in capsys.readouterr().out


def test_scaling_efficiency_is_t1_over_w_tw():
    rows = [
        dict(config="a", method="m", n=8, world=1, ms={"fw+bw": 10.0}),
        dict(config="a", method="m", n=8, world=4, ms={"fw+bw": 4.0}),
        dict(config="a", method="m", n=16, world=4, ms={"fw+bw": 4.0}),  # no world-1 twin
        dict(config="a", method="m", n=8, world=2, ms={}),  # failed: no time
    ]
    tp_round.scaling_efficiency(rows)
    assert [r.get("efficiency") for r in rows] == [1.0, 10.0 / 16.0, None, None]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited


def test_timeout_stops_torchrun_and_its_ranks(tmp_path, monkeypatch):
    """torchrun's ranks run in their own sessions: a timed-out world must not leave them running."""
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "sleeper.py").write_text(
        "import os, time\n"
        f"open(os.path.join({str(pids)!r}, str(os.getpid())), 'w').close()\n"
        "time.sleep(300)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT)]))
    started = time.monotonic()
    code = tp_round.torchrun("sleeper", [], 2, tmp_path / "log", timeout=10)
    assert time.monotonic() - started < 120
    assert code == 124 and "timed out after 10" in (tmp_path / "log").read_text()
    ranks = [int(p.name) for p in pids.iterdir()]
    assert len(ranks) == 2
    for pid in ranks:
        for _ in range(50):  # SIGTERM is handled promptly; allow a few seconds on a loaded machine
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid), f"rank process {pid} outlived the timeout"
