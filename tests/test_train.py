"""The training demo end to end: the CPU config under torchrun with 2 ranks, a few steps.

Same seed, same batches, same math: the two loss paths (vpcce and the materialized Megatron-style
vocab-parallel cross-entropy) must give the same first losses; vpcce's loss op must hold less
memory than the materialized logits; the replicated body must stay identical on both ranks.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import yaml
from multiproc import run_torchrun

from vpcce.launch.config import TrainConfig, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "cpu_demo.yaml"
STEPS = 3
TIMEOUT_S = 300  # ~20 s alone on 2 cores; generous for a loaded CI machine (pytest -n auto)
FIRST_LOSS_TOL = 1e-4  # fp32, same inputs and weights (measured: <= 2e-6)
EARLY_LOSS_TOL = 1e-3  # steps 2-3 follow one or two AdamW updates from the two paths' gradients


@pytest.mark.slow
def test_cpu_demo_two_ranks(tmp_path):
    out = tmp_path / "out"
    args = ["--config", str(CONFIG), f"steps={STEPS}", "memory_every=1", f"out_dir={out}"]
    proc = run_torchrun("vpcce.launch.train", *args, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert "final loss" in proc.stdout  # rank 0's summary table

    record = json.loads((out / "train.json").read_text())
    try:
        import matplotlib  # noqa: F401

        assert (out / "loss.png").stat().st_size > 0
    except ImportError:
        pass
    assert record["config"]["steps"] == STEPS
    assert record["config"]["vocab_size"] >= 32768
    assert record["vocab_shards"] == [[0, 16384], [16384, 32768]]
    vp, mat = record["paths"]["vpcce"], record["paths"]["materialized"]
    for res in (vp, mat):
        assert len(res["losses"]) == STEPS
        assert all(math.isfinite(x) for x in res["losses"])
        assert res["replica_max_abs_diff"] == 0.0
    assert abs(vp["losses"][0] - math.log(32768)) < 0.1  # an untrained model: ln V
    assert abs(vp["losses"][0] - mat["losses"][0]) <= FIRST_LOSS_TOL
    assert (
        max(abs(a - b) for a, b in zip(vp["losses"], mat["losses"], strict=True)) <= EARLY_LOSS_TOL
    )
    # the materialized path holds [N, V / 2] fp32 logits and their softmax; vpcce a few tiles
    n = 16 * 63
    assert mat["loss_op_peak_bytes"] >= n * 16384 * 4
    assert vp["loss_op_peak_bytes"] < mat["loss_op_peak_bytes"] / 4


def test_config_overrides(tmp_path):
    cfg = load_config(
        CONFIG, ["steps=5", "lr=3e-3", "out_dir=/tmp/x", "paths=[vpcce]", "chunk_bytes=null"]
    )
    assert cfg.name == "cpu_demo" and cfg.steps == 5 and cfg.lr == 3e-3
    assert cfg.paths == ["vpcce"] and cfg.chunk_bytes is None
    assert str(cfg.resolved_out_dir()) == "/tmp/x"
    assert load_config(CONFIG).resolved_out_dir() == pathlib.Path("out/train/cpu_demo")
    # every key of the shipped configs is a TrainConfig field
    fields = set(TrainConfig.__dataclass_fields__)
    for path in (ROOT / "configs" / "train").glob("*.yaml"):
        assert set(yaml.safe_load(path.read_text())) <= fields, path.name
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(CONFIG, ["stepz=5"])
    with pytest.raises(ValueError, match="steps must be int"):
        load_config(CONFIG, ["steps=fast"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(CONFIG, ["steps"])
    with pytest.raises(ValueError, match="needs device='cuda'"):
        load_config(ROOT / "configs" / "train" / "gpt_megatron_h100.yaml", ["device=cpu"])
