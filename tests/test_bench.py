"""`vpcce.launch.bench` end to end on CPU: the tiny config in-process, the Triton interpreter path,
two gloo ranks under torchrun (vocab-parallel), and config validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from multiproc import run_torchrun

from vpcce.launch import bench

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "bench" / "cpu_tiny.yaml"
FP32_ERR = 1e-5  # fp32 inputs, exact methods, against the fp64 truth


def _rows(report: dict, **match) -> list[dict]:
    return [r for r in report["results"] if all(r[k] == v for k, v in match.items())]


def test_cpu_tiny_writes_table_json_png(tmp_path, capsys):
    report = bench.main(["--config", str(TINY), f"out={tmp_path}"])
    stdout = capsys.readouterr().out
    cfg = report["config"]
    names = ["flat"] + [bench.peaked_name(h) for h in cfg["entropies"]]

    # files: JSON with every number, the same table as stdout, a PNG
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"cpu_tiny.{ext}").stat().st_size > 0
    assert (tmp_path / "cpu_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "cpu_tiny.json").read_text())
    assert saved["results"] == report["results"] and saved["complete"]
    assert saved["env"]["torch"] and saved["env"]["date"] and saved["env"]["device"]
    table = (tmp_path / "cpu_tiny.md").read_text().strip()
    assert stdout.rstrip().endswith(table.splitlines()[-1])  # the table is printed last

    # data sets: the requested mean entropies, reported
    assert [d["name"] for d in report["data"]] == names
    for d in report["data"][1:]:
        target = float(d["name"].split("~")[1])
        assert abs(d["mean_entropy"] - target) < 0.1, d
    assert all(math.isfinite(d["mean_nll"]) for d in report["data"])

    # every data set x N x method ran, with times, memory and small errors
    assert len(report["results"]) == len(names) * len(cfg["n"]) * (1 + len(cfg["methods"]))
    for data in names:
        for n in cfg["n"]:
            (floor,) = _rows(report, data=data, n=n, method=bench.FLOOR)
            assert floor["ms"]["fw+bw"] == pytest.approx(4 * floor["gemm_ms"])
            assert floor["gemm_ms_after"] > 0  # timed again after the methods: the drift
            assert f"- floor drift ({data}, N {n}): the GEMM took" in table
            for method in cfg["methods"]:
                (row,) = _rows(report, data=data, n=n, method=method)
                assert row["status"] == "ok", row
                assert set(row["ms"]) == set(cfg["kinds"]) and min(row["ms"].values()) > 0
                assert min(row["mem_mb"].values()) >= 0
                assert max(row["err"].values()) < FP32_ERR, row
                assert f"| {data} | {n} | {method} |" in table
    assert report["unavailable"] == {}


def test_overrides_triton_interpreter_and_unavailable_methods(tmp_path, capsys):
    """vpcce's Triton kernels (interpreted) through the bench; a missing package is a note."""
    report = bench.main(
        [
            "--config",
            str(TINY),
            f"out={tmp_path}",
            "vpcce_impl=triton",
            "n=64",
            "flat=false",
            "entropies=[5]",
            "warmup=0",
            "rep=1",
            "kinds=[fw+bw]",
            "name=tri",
            "methods=[vpcce_exact, vpcce, eager, liger]",
        ]
    )
    table = capsys.readouterr().out
    assert report["env"]["vpcce_impl"] == "triton" and report["env"]["triton_interpret"]
    assert report["config"]["n"] == [64]
    assert "liger" in report["unavailable"]  # liger needs CUDA (and is not installed here)
    assert "not run: `liger`" in table
    for method in ("vpcce_exact", "vpcce", "eager"):
        (row,) = _rows(report, method=method)
        assert list(row["ms"]) == ["fw+bw"]
        assert max(row["err"].values()) < FP32_ERR, row
    assert (tmp_path / "tri.png").exists()


def test_two_gloo_ranks_vocab_parallel(tmp_path):
    """Under torchrun the classifier is split: vpcce runs vocab-parallel, eager is skipped."""
    args = [
        "--config",
        str(TINY),
        f"out={tmp_path}",
        "n=[64]",
        "flat=false",
        "entropies=[5]",
        "warmup=0",
        "rep=1",
        "methods=[vpcce_exact,eager]",
        "comm=true",
    ]
    # the ranks leave through `vpcce.launch.process_exit` (gloo's teardown at interpreter exit
    # aborted a rank in 2 CI runs of this test)
    proc = run_torchrun("vpcce.launch.bench", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "cpu_tiny.json").read_text())
    assert report["env"]["world_size"] == 2 and report["shard"]["rank0_stop"] == 500
    assert "not vocab-parallel" in report["unavailable"]["eager"]
    (row,) = _rows(report, method="vpcce_exact")
    assert row["status"] == "ok" and max(row["err"].values()) < FP32_ERR, row
    assert "world 2 (vocab-parallel" in proc.stdout
    # gloo: the collectives of one fw+bw are timed; the caller waits, so nothing is hidden
    assert row["comm"]["ms"] > 0 and row["comm"]["overlapped_ms"] is None, row
    assert "collectives of one fw+bw, `vpcce_exact`" in proc.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nope=1"], "unknown config keys"),
        (["methods=[vpcce, nope]"], "methods must be"),
        (["kinds=[fw, backward]"], "kinds must be"),
        (["n=[0]"], "n must be"),
        (["dtype=fp8"], "dtype must be"),
        (["flat=false", "entropies=[]"], "no data set"),
        (["error=maybe"], "error must be true or false"),
        (["out=3"], "out must be a string"),
        (["n"], "key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        bench.load_config(TINY, overrides)


def test_config_scalars_become_lists():
    cfg = bench.load_config(TINY, ["n=8192", "entropies=4", "kinds=[fw+bw, fw]"])
    assert cfg.n == [8192] and cfg.entropies == [4.0] and cfg.kinds == ["fw", "fw+bw"]
    assert cfg.name == "cpu_tiny" and cfg.out_dir() == Path("out/bench/cpu_tiny")
