"""`vpcce.launch.ratio` on the CPU: every repetition times the GEMM, fw and fw+bw in turn."""

import json
import math

from vpcce.launch import ratio


def test_ratio_times_each_repetition_in_turn(tmp_path, capsys):
    out = tmp_path / "r.json"
    rows = ratio.main(
        ["--n", "48", "--d", "16", "--v", "300", "--entropies", "1,5", "--reps", "3",
         "--impl", "torch", "--device", "cpu", "--json", str(out)]
    )  # fmt: skip
    assert [r["entropy"] for r in rows] == [1.0, 5.0]
    for r in rows:
        timed = {k: len(v) for k, v in r["ms"].items()}
        assert timed == {"gemm": 3, "4gemm": 3, "fw": 3, "fw+bw": 3}
        fw = sorted(f / g for f, g in zip(r["ms"]["fw"], r["ms"]["gemm"], strict=True))
        assert r["ratio"]["fw"] == fw[1]  # the median of the per-repetition ratios
        four = sorted(f / g for f, g in zip(r["ms"]["fw+bw"], r["ms"]["4gemm"], strict=True))
        assert r["ratio"]["fw+bw/4gemm"] == four[1]
        assert all(math.isfinite(x) and x > 0 for x in r["ratio"].values())
        assert {k: len(v) for k, v in r["host_ms"].items()} == timed
        assert r["median_host_ms"]["fw"] == sorted(r["host_ms"]["fw"])[1]
    assert json.loads(out.read_text())["rows"][1]["ratio"] == rows[1]["ratio"]
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| N × D × V") and len(table) == 2 + len(rows)


def test_ratio_times_the_against_mode_in_turn(capsys, monkeypatch):
    """``--against``: that filter_eps's fw+bw in every repetition, and the median difference;
    the other options reach every call."""
    calls, real = [], ratio.linear_cross_entropy
    monkeypatch.setattr(
        ratio, "linear_cross_entropy", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    rows = ratio.main(
        ["--n", "48", "--d", "16", "--v", "300", "--entropies", "1", "--reps", "3",
         "--impl", "torch", "--device", "cpu", "--filter-eps", "tail", "--against", "none",
         "--idle-ms", "1", "--lead-ms", "1", "--accum-e-fp32"]
    )  # fmt: skip
    ms = rows[0]["ms"]
    assert len(ms["against"]) == 3
    assert {k["filter_eps"] for k in calls} == {"tail", None}
    assert all(k["accum_e_fp32"] for k in calls)
    diffs = sorted(a - b for a, b in zip(ms["fw+bw"], ms["against"], strict=True))
    assert rows[0]["difference_ms"] == diffs[1]
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].endswith("none fw+bw ms | difference ms |")
    assert table[1].count("|") == table[0].count("|") == table[2].count("|")
