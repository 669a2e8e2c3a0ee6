"""vpcce as the loss of a Megatron-Core GPTModel, against Megatron's own loss (CPU, gloo, TP = 2).

Each megatron-core version is one spawned group of 2 ranks that runs every case of
tests/megatron_ranks.py: the same fp32 model and inputs go through Megatron's
``vocab_parallel_cross_entropy`` path and through vpcce's (``patch(model)``, the
``output_processor`` hook of megatron-core >= 0.18, or both), with sequence parallelism on and
off, tied and untied output weights, a padded vocabulary, one MTP layer, MuP's output multiplier,
a HybridModel (megatron-core >= 0.19),
gradient-accumulation fusion into ``main_grad``, eval and ``labels=None`` (logits). Every rank
compares its own per-token loss, logits, parameter gradients (its shards), decoder-output gradient
and MTP logging with Megatron's; the parent holds them to the tolerances below.

Versions: every ``.megatron/<version>/`` directory (``pip install --target``, made by .ci/run) is
tested with that directory first on the ranks' ``sys.path``; without any, an importable
megatron-core is tested; without that, the test is skipped.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from megatron_ranks import CASES, HOOK_CASES, HYBRID_CASES
from multiproc import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORLD = 2
LOSS_TOL = 1e-6  # fp32 per-token loss, relative to the largest (measured: <= 2e-7)
GRAD_TOL = 1e-5  # fp32 gradients, relative to the largest entry (measured: <= 5e-7)
LOGITS_TOL = 0.0  # labels=None: the very logits Megatron computes


def _installs() -> list:
    dirs = sorted(p for p in (ROOT / ".megatron").glob("*") if (p / "megatron" / "core").is_dir())
    if dirs:
        return [pytest.param(str(p), id=p.name) for p in dirs]
    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return [pytest.param(None, id="installed")]
    skip = pytest.mark.skip(reason="megatron-core is not installed")
    return [pytest.param(None, id="none", marks=skip)]


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _check_case(name: str, r: dict) -> list[str]:
    """Failures of one case, as readable lines."""
    bad = []
    if r["shape"][0] != r["shape"][1]:
        bad.append(f"shape {r['shape'][0]} != Megatron's {r['shape'][1]}")
    if "logits" in r:
        if r["logits"] > LOGITS_TOL:
            bad.append(f"logits rel err {r['logits']:.2e}")
        return bad
    if r["materialized"]:
        bad.append(f"the loss built the logits {r['materialized']} times")
    if r["dtype"] != "torch.float32":
        bad.append(f"loss dtype {r['dtype']}")
    if not r["loss"] <= LOSS_TOL:
        bad.append(f"loss rel err {r['loss']:.2e}")
    if "grads" in r:
        if r["params"][0] != r["params"][1]:
            bad.append(f"parameters with gradients differ: {r['params']}")
        bad += [f"grad {n} rel err {e:.2e}" for n, e in r["grads"].items() if not e <= GRAD_TOL]
        if not r["hidden"] <= GRAD_TOL:
            bad.append(f"decoder-output grad rel err {r['hidden']:.2e}")
        for key, (got, ref) in r["mtp"].items():
            pairs = zip(got, ref, strict=True)
            close = all(abs(a - b) <= LOSS_TOL * max(1.0, abs(b)) for a, b in pairs)
            # counts exactly (0.19's acceptance counts, from the kernel's top-1); losses closely
            if key in ("correct_values", "total_values") and got != ref or not close:
                bad.append(f"MTP {key} {got} != Megatron's {ref}")
    if "main_grad" in r:
        if not r["main_grad"] <= GRAD_TOL:
            bad.append(f"main_grad rel err {r['main_grad']:.2e}")
        if r["flag"][0] != r["flag"][1]:
            bad.append(f"grad_added_to_main_grad {r['flag'][0]} != Megatron's {r['flag'][1]}")
        got, ref = r["out_grad"]
        # a dummy .grad: Megatron returns torch.empty unless zero_out_wgrad; compare shapes then
        if (got is None) != (ref is None) or got and (got[0] != ref[0] or (ref[1] and not got[1])):
            bad.append(f"output weight .grad {got} vs Megatron's {ref}")
    if not r["state_dict_unchanged"]:
        bad.append("state_dict keys changed")
    return [f"{name}: {line}" for line in bad]


@pytest.mark.parametrize("megatron_path", _installs())
def test_megatron_gpt_model_matches_megatron_loss(megatron_path):
    ranks = run_ranks(run_cases_entry, WORLD, megatron_path, timeout=300)
    version = ranks[0]["version"]
    if megatron_path is not None:
        assert ranks[0]["file"].startswith(megatron_path), ranks[0]["file"]
    expected = set(CASES) | (set(HOOK_CASES) if _version_tuple(version) >= (0, 18) else set())
    expected |= set(HYBRID_CASES) if _version_tuple(version) >= (0, 19) else set()
    bad = []
    for rank, res in enumerate(ranks):
        ran = set(res) - {"version", "file", "refusals", "top1", "protocol"}
        assert ran == expected, f"megatron-core {version}: cases {sorted(ran ^ expected)}"
        for name in sorted(ran):
            bad += [f"rank {rank} {line}" for line in _check_case(name, res[name])]
            layer = res[name]["layer"]
            patched = "patch" in {**CASES, **HOOK_CASES, **HYBRID_CASES}[name].get("path", "patch")
            if layer != ("VocabParallelOutputLayer" if patched else "ColumnParallelLinear"):
                bad.append(f"rank {rank} {name}: output layer is {layer}")
        top1 = res["top1"]
        queries = ("True", "None") if _version_tuple(version) >= (0, 19) else ("True",)
        if any(not top1[f"equal_{q}"] or top1[f"materialized_{q}"] for q in queries):
            bad.append(f"rank {rank} top-1 from the kernel's argmax: {top1}")
        if top1["no_mtp_materialized"] != 1 or not top1["no_mtp_equal"]:
            bad.append(f"rank {rank} top-1 without MTP (from the logits): {top1}")
        failed = [k for k, ok in res["protocol"].items() if not ok]
        if failed:
            bad.append(f"rank {rank} DeferredLogits did not act as the logits: {failed}")
        refused = {k: v[0] for k, v in res["refusals"].items()}
        if refused != {"unknown_option": "TypeError", "defer_embedding_wgrad_compute": "ValueError",
                       "not_a_model": "TypeError"}:
            bad.append(f"rank {rank} refusals: {res['refusals']}")
    assert not bad, f"megatron-core {version}:\n" + "\n".join(bad)


def run_cases_entry(rank, world, megatron_path):
    import megatron_ranks

    return megatron_ranks.run_cases(rank, world, megatron_path)
